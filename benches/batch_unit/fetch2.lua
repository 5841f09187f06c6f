-- fetch2.lua (PROTOTYPE for issue 12, used only by benches/batch_unit.rs; not the protocol):
-- a handler takes whole batches; its in-flight record is one hash field per batch plus an
-- open-message count, and which indexes are still open is the done bitmap itself.
-- KEYS[1]: the batch queue (see generate2.lua)
-- KEYS[2]: this handler's in-flight hash: field "<first>" = the entry, field "o<first>" = open count
-- ARGV[1]: the most batches to take (1 .. 1000)
-- Returns: the entries taken, in queue order.
local got = redis.call('LPOP', KEYS[1], ARGV[1])
if not got then
  return {}
end
local fields = {}
for _, e in ipairs(got) do
  local first, n = string.match(e, '^(%d+):(%d+):')
  fields[#fields + 1] = first
  fields[#fields + 1] = e
  fields[#fields + 1] = 'o' .. first
  fields[#fields + 1] = n
end
redis.call('HSET', KEYS[2], unpack(fields))
return got
