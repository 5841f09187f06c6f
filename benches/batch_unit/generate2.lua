-- generate2.lua (PROTOTYPE for issue 12, used only by benches/batch_unit.rs; not the protocol):
-- one queue entry per generated batch instead of one per message.
-- KEYS[1]: the lease ({ns}:leader), whose value must equal ARGV[1] (the fencing check)
-- KEYS[2]: the id counter ({ns}:next)
-- KEYS[3]: the batch queue, a list of "<first>:<n>:<time_ms>" entries
-- ARGV[1]: this generator's lease value; ARGV[2]: n, the batch's message count (>= 1)
-- Returns: first, the batch's first id (ids first .. first+n-1 are now queued, gap-free).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED generate2: the lease is not ours')
end
local n = tonumber(ARGV[2])
local first = redis.call('INCRBY', KEYS[2], n) - n
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('RPUSH', KEYS[3], first .. ':' .. n .. ':' .. ms)
return first
