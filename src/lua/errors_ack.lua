-- errors_ack.lua: delete the first `count` drain entries, which the caller has printed.
-- KEYS[1]: drain lock ({ns}:errors:lock)
-- KEYS[2]: drain list ({ns}:errors:drain)
-- ARGV[1]: our token
-- ARGV[2]: count, integer >= 0 (entries printed, from the head)
-- ARGV[3]: lock_ms, integer > 0 (the lock is extended on every ack)
-- Returns: entries left in the drain list, or -1 when the lock is no longer ours (nothing deleted:
-- whoever holds it now prints from the head again, so an entry may be printed twice but never lost).
local count = tonumber(ARGV[2])
local ms = tonumber(ARGV[3])
if not count or count < 0 or not ms or ms <= 0 then
  return redis.error_reply('ERR errors_ack: bad arguments')
end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
redis.call('PEXPIRE', KEYS[1], ms)
if count > 0 then
  redis.call('LTRIM', KEYS[2], count, -1)
end
return redis.call('LLEN', KEYS[2])
