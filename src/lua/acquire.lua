-- acquire.lua: take the leader lease if it is free, under a new fencing epoch.
-- KEYS[1]: lease key ({ns}:lease), string "<epoch>:<instance>" with a TTL
-- KEYS[2]: epoch counter ({ns}:epoch), integer
-- KEYS[3]: holder's connection id ({ns}:lease:conn), integer
-- ARGV[1]: instance id (unique per process)
-- ARGV[2]: lease_ms, integer > 0
-- ARGV[3]: the caller's Redis connection id (CLIENT ID), recorded for fast death detection
-- Returns: {epoch, value}: epoch > 0 and value = "<epoch>:<instance>" when this call took the lease;
--          {0, holder} when the lease is held (holder = its current value).
-- Atomic because INCR and SET must not be separated: two candidates must never share an epoch,
-- and an epoch must never be spent without a lease carrying it.
local ms = tonumber(ARGV[2])
if not ms or ms <= 0 or ms ~= math.floor(ms) then
  return redis.error_reply('ERR lease_ms must be a positive integer')
end
if not string.match(ARGV[3] or '', '^%d+$') then
  return redis.error_reply('ERR client id must be a decimal integer')
end
local holder = redis.call('GET', KEYS[1])
if holder then
  return {0, holder}
end
local epoch = redis.call('INCR', KEYS[2])
local value = epoch .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], value, 'PX', ms)
redis.call('SET', KEYS[3], ARGV[3])
return {epoch, value}
