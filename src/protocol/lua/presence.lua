-- presence.lua: write this process's entry in the instance registry, stamped with Redis time.
-- KEYS[1]: instance registry ({ns}:instances), hash instance id -> JSON
-- KEYS[2]: error store ({ns}:errors), for the entry naming a registry of the wrong type set aside
-- KEYS[3]: stats hash ({ns}:stats)
-- ARGV[1]: instance id, non-empty
-- ARGV[2]: the entry as a JSON object with its closing brace cut off, ending in `"seen_us":`;
--          the script appends the Redis time in µs and the brace. (Text, not cjson.encode: cjson
--          would print a 16-digit number in exponent form.)
-- Returns: the Redis time written, µs.
-- One HSET of the caller's own field and nothing else, so writers never clash; the time comes from
-- Redis so `status` compares it with Redis's clock only, never with another machine's.
local id, body = ARGV[1], ARGV[2]
if not id or id == '' or not body or string.sub(body, 1, 1) ~= '{'
    or string.sub(body, -10) ~= '"seen_us":' then
  return redis.error_reply('ERR presence: bad arguments')
end
local now = redis_now()
guard('presence', now, KEYS[2], KEYS[3], {{KEYS[1], 'hash'}})
redis.call('HSET', KEYS[1], id, body .. now .. '}')
return tonumber(now)
