-- fetch.lua: move messages into this handler's in-flight set: reclaimed ones first, spread out,
-- then fresh ones from the queue.
-- KEYS[1]: queue ({ns}:queue), list of fresh messages
-- KEYS[2]: this handler's in-flight set ({ns}:inflight:<handler>)
-- KEYS[3]: handler registry ({ns}:handlers), set
-- KEYS[4]: this handler's heartbeat ({ns}:hb:<handler>)
-- KEYS[5]: error store ({ns}:errors), list
-- KEYS[6]: stats hash ({ns}:stats)
-- KEYS[7]: retry set ({ns}:retry): messages reclaimed once
-- KEYS[8]: isolation list ({ns}:isolate): messages reclaimed twice or more
-- ARGV[1]: handler id
-- ARGV[2]: count, integer >= 1: messages to take in all
-- ARGV[3]: heartbeat_ms, integer > 0 (a fetch is proof of life: it refreshes the heartbeat)
-- ARGV[4]: retry_max, integer >= 0: at most this many from the retry set (SPOP: a random sample,
--          so messages that died together are not fetched together again)
-- ARGV[5]: "1" when the handler holds no isolated message: it may take one (at most one at a
--          time, so if it crashes again the culprit is singled out; see reclaim.lua)
-- Returns: {time_us, payload, payload, ...} (no payloads when there is nothing to do)
-- Atomic because a message must never be outside all of: the queue, the retry set, the isolation
-- list, an in-flight set. A queue key of the wrong type (garbage) is renamed aside to
-- {ns}:queue:quarantine:<time_us> and an error entry says so: the data is kept, the system goes on.
local count = tonumber(ARGV[2])
local hb_ms = tonumber(ARGV[3])
local retry_max = tonumber(ARGV[4])
if not count or count < 1 or not hb_ms or hb_ms <= 0 or not retry_max or retry_max < 0 then
  return redis.error_reply('ERR fetch: bad arguments')
end
local t = redis.call('TIME')
-- As a string: Lua 5.1 would print a 16-digit number in exponent form.
local now = t[1] .. string.format('%06d', tonumber(t[2]))
local now_us = tonumber(now)
redis.call('SET', KEYS[4], now, 'PX', hb_ms)
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'list' and kind ~= 'none' then
  local aside = KEYS[1] .. ':quarantine:' .. now
  redis.call('RENAME', KEYS[1], aside)
  redis.call('RPUSH', KEYS[5], aside .. '\tqueue key had type ' .. kind .. ', moved to ' .. aside .. '\t' .. now)
  redis.call('HINCRBY', KEYS[6], 'bad', 1)
  return {now_us}
end
local msgs = {}
if ARGV[5] == '1' then
  local one = redis.call('LPOP', KEYS[8])
  if one then msgs[1] = one end
end
local want = math.min(retry_max, count - #msgs)
if want > 0 then
  for _, p in ipairs(redis.call('SPOP', KEYS[7], want)) do
    msgs[#msgs + 1] = p
  end
end
want = count - #msgs
if want > 0 then
  local fresh = redis.call('LPOP', KEYS[1], want)
  if fresh then
    for _, p in ipairs(fresh) do
      msgs[#msgs + 1] = p
    end
  end
end
if #msgs == 0 then
  return {now_us}
end
for i = 1, #msgs, 1000 do
  redis.call('SADD', KEYS[2], unpack(msgs, i, math.min(i + 999, #msgs)))
end
redis.call('SADD', KEYS[3], ARGV[1])
table.insert(msgs, 1, now_us)
return msgs
