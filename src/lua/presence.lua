-- presence.lua: write this process's entry in the instance registry, stamped with Redis time.
-- KEYS[1]: instance registry ({ns}:instances), hash instance id -> JSON
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
redis.call('HSET', KEYS[1], id, body .. now .. '}')
return tonumber(now)
