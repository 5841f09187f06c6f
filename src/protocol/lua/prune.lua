-- prune.lua: delete instance registry entries not refreshed for a long time.
-- KEYS[1]: instance registry ({ns}:instances), hash instance id -> JSON with "seen_us":<µs>
-- KEYS[2]: error store ({ns}:errors), for the entry naming a registry of the wrong type set aside
-- KEYS[3]: stats hash ({ns}:stats)
-- ARGV[1]: max_age_ms, integer > 0
-- Returns: the number of entries deleted.
-- A SIGKILLed process cannot delete its own entry, and `status` is read-only, so a joining process
-- runs this once to keep the registry bounded. Entries without a readable seen_us are not
-- presence.lua's and are deleted too. One script, so an entry refreshed meanwhile is never deleted.
local age_ms = tonumber(ARGV[1])
if not age_ms or age_ms <= 0 then
  return redis.error_reply('ERR prune: bad max_age_ms')
end
local now, now_us = redis_now()
guard('prune', now, KEYS[2], KEYS[3], {{KEYS[1], 'hash'}})
local oldest_us = now_us - age_ms * 1000
local all = redis.call('HGETALL', KEYS[1])
local deleted = 0
for i = 1, #all, 2 do
  local seen = tonumber(string.match(all[i + 1], '"seen_us":(%d+)'))
  if not seen or seen < oldest_us then
    redis.call('HDEL', KEYS[1], all[i])
    deleted = deleted + 1
  end
end
return deleted
