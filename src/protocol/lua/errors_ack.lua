#!lua flags=allow-oom
-- errors_ack.lua: delete the first `count` drain entries, which the caller has printed.
-- Runs under Redis's out-of-memory refusal (allow-oom): it frees memory or holds a small lock,
-- and getErrors is the tool that frees memory.
-- KEYS[1]: drain lock ({ns}:errors:lock)
-- KEYS[2]: drain list ({ns}:errors:drain)
-- KEYS[3]: error store ({ns}:errors), for the entry naming a key of the wrong type set aside
-- KEYS[4]: stats hash ({ns}:stats)
-- ARGV[1]: our token
-- ARGV[2]: count, integer >= 0 (entries printed, from the head)
-- ARGV[3]: lock_ms, integer > 0 (the lock is extended on every ack)
-- ARGV[4]: expected_len, integer >= count: the drain list's length before this trim. Only the
--          lock holder changes the drain list, so its length is a version: a retry of an ack
--          whose reply was lost finds the list already `count` shorter and trims nothing more.
-- Returns: entries left in the drain list; -1 when the lock is no longer ours (nothing deleted:
-- whoever holds it now prints from the head again, so an entry may be printed twice but never
-- lost).
-- Errors (nothing deleted): bad arguments; a length that is neither expected_len nor
-- expected_len - count (the list changed under its lock holder).
local count = tonumber(ARGV[2])
local ms = tonumber(ARGV[3])
local expected = tonumber(ARGV[4])
if not count or count < 0 or not ms or ms <= 0 or not expected or expected < count then
  return redis.error_reply('ERR errors_ack: bad arguments')
end
guard('errors_ack', redis_now(), KEYS[3], KEYS[4], {{KEYS[1], 'string'}, {KEYS[2], 'list'}})
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
redis.call('PEXPIRE', KEYS[1], ms)
local len = redis.call('LLEN', KEYS[2])
if len == expected then
  if count > 0 then
    redis.call('LTRIM', KEYS[2], count, -1)
  end
  return len - count
end
if len == expected - count then
  return len -- this ack already landed; its reply was lost
end
return redis.error_reply('ERR errors_ack: ' .. KEYS[2] .. ' has ' .. len .. ' entries, expected ' .. expected .. ' (or ' .. (expected - count) .. ')')
