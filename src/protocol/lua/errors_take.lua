#!lua flags=allow-oom
-- errors_take.lua: start (or resume) a getErrors drain under a lock.
-- Runs under Redis's out-of-memory refusal (allow-oom): it frees memory or holds a small lock,
-- and getErrors is the tool that frees memory.
-- KEYS[1]: drain lock ({ns}:errors:lock), string token with a TTL
-- KEYS[2]: error store ({ns}:errors), list
-- KEYS[3]: drain list ({ns}:errors:drain)
-- KEYS[4]: stats hash ({ns}:stats)
-- ARGV[1]: our token (unique per getErrors process)
-- ARGV[2]: lock_ms, integer > 0
-- ARGV[3]: "take" to move the current error store into the drain list when the drain list is
--          empty; "resume" to only lock (drain what a killed getErrors left)
-- Returns: the number of entries in the drain list, or -1 when another getErrors holds the lock.
-- RENAME moves the whole store at once: errors arriving later go to a new store for the next call,
-- and nothing can slip between a read and a delete. A lock, store or drain list of the wrong type
-- is set aside first, with an error entry naming it (printed by this drain).
local ms = tonumber(ARGV[2])
if not ms or ms <= 0 then
  return redis.error_reply('ERR errors_take: bad lock_ms')
end
guard('errors_take', redis_now(), KEYS[2], KEYS[4], {{KEYS[1], 'string'}, {KEYS[3], 'list'}})
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return -1
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ms)
if ARGV[3] == 'take' and redis.call('EXISTS', KEYS[3]) == 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('RENAME', KEYS[2], KEYS[3])
end
return redis.call('LLEN', KEYS[3])
