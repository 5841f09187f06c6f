-- fetch.lua: move up to `count` messages from the queue into this handler's in-flight set.
-- KEYS[1]: queue ({ns}:queue), list
-- KEYS[2]: this handler's in-flight set ({ns}:inflight:<handler>)
-- KEYS[3]: handler registry ({ns}:handlers), set
-- KEYS[4]: this handler's heartbeat ({ns}:hb:<handler>)
-- KEYS[5]: error store ({ns}:errors), list
-- KEYS[6]: stats hash ({ns}:stats)
-- ARGV[1]: handler id
-- ARGV[2]: count, integer >= 1
-- ARGV[3]: heartbeat_ms, integer > 0 (a fetch is proof of life: it refreshes the heartbeat)
-- Returns: {time_us, payload, payload, ...} (no payloads when the queue is empty)
-- Atomic because a message must never be outside both the queue and an in-flight set.
-- A queue key of the wrong type (garbage) is renamed aside to {ns}:queue:quarantine:<time_us> and an
-- error entry saying so goes to the error store: the data is kept, the system goes on.
local count = tonumber(ARGV[2])
local hb_ms = tonumber(ARGV[3])
if not count or count < 1 or not hb_ms or hb_ms <= 0 then
  return redis.error_reply('ERR fetch: bad arguments')
end
local t = redis.call('TIME')
-- As a string: Lua 5.1 would print a 16-digit number in exponent form.
local now = t[1] .. string.format('%06d', tonumber(t[2]))
local now_us = tonumber(now)
redis.call('SET', KEYS[4], now, 'PX', hb_ms)
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'list' then
  if kind ~= 'none' then
    local aside = KEYS[1] .. ':quarantine:' .. now
    redis.call('RENAME', KEYS[1], aside)
    redis.call('RPUSH', KEYS[5], aside .. '\tqueue key had type ' .. kind .. ', moved to ' .. aside .. '\t' .. now)
    redis.call('HINCRBY', KEYS[6], 'bad', 1)
  end
  return {now_us}
end
local msgs = redis.call('LPOP', KEYS[1], count)
if not msgs then
  return {now_us}
end
for i = 1, #msgs, 1000 do
  redis.call('SADD', KEYS[2], unpack(msgs, i, math.min(i + 999, #msgs)))
end
redis.call('SADD', KEYS[3], ARGV[1])
table.insert(msgs, 1, now_us)
return msgs
