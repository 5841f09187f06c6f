-- fetch.lua: move messages into this handler's in-flight set: reclaimed ones first, spread out,
-- then fresh ones from the queue.
-- KEYS[1]: queue ({ns}:queue), list of fresh messages
-- KEYS[2]: this handler's in-flight set ({ns}:inflight:<handler>)
-- KEYS[3]: handler registry ({ns}:handlers), set
-- KEYS[4]: this handler's heartbeat ({ns}:hb:<handler>)
-- KEYS[5]: error store ({ns}:errors), list
-- KEYS[6]: stats hash ({ns}:stats)
-- KEYS[7]: retry set ({ns}:retry): messages reclaimed once
-- KEYS[8..12]: suspect lists ({ns}:suspects:2 .. {ns}:suspects:6): messages reclaimed 2..6 times
-- KEYS[13]: incarnation ({ns}:incarnation)
-- KEYS[14]: this handler's batch records ({ns}:batches:<handler>), hash: field "<first_id>" =
--           "<open>:<count>:<epoch>:<generated_us>:<mask>", mask = ceil(count/8) bytes, bit i
--           (MSB first) set while message first_id+i is this handler's and has no outcome from it;
--           open = the number of set bits. The per-message in-flight set holds everything else.
-- KEYS[15]: write counts ({ns}:writes), hash copy -> guarded calls (prelude.lua, forgotten)
-- ARGV[1]: handler id
-- ARGV[2]: count, integer >= 1: messages to take in all
-- ARGV[3]: heartbeat_ms, integer > 0 (a fetch is proof of life: it refreshes the heartbeat)
-- ARGV[4]: retry_max, integer >= 0: at most this many from the retry set (SPOP: a random sample,
--          so messages that died together are not fetched together again)
-- ARGV[5]: held_level: the level (2..6) of the suspects the handler holds, 0 if none
-- ARGV[6]: held_count: how many suspects it holds
-- ARGV[7]: suspect_base, integer >= 1: the group size at level L is max(1, base / 10^(L-1))
-- ARGV[8]: the guard "<token>/<copy>/<acked>": the incarnation token this copy joined, its copy id and its count of guarded calls seen to succeed (FORGOTTEN error, nothing written, otherwise)
-- Returns: {time_us, lapsed, b, batch_1 .. batch_b, payload, payload, ...}: the b batches taken
--   from the queue as "<first_id>:<count>:<epoch>:<generated_us>" (now records in KEYS[14]), then
--   the single payloads (now members of KEYS[2]); nothing after b when there is nothing to do;
--   lapsed is 1 when the heartbeat key was absent before this call refreshed it: the handler's
--   heartbeat had expired, so reclaim.lua may have taken its in-flight set, and the handler must
--   reconcile what it holds with its set (docs/PROTOCOL.md, invariant 5).
-- A batch entry of the queue (generate.lua) is taken whole when it fits in what is left of
-- count; otherwise its head is taken and the entry left at the head of the queue with the rest
-- (which starts on a multiple of 8 when the head can be cut there: the call may then take up to
-- 7 fewer than count).
-- Suspects come first: a handler holding none takes a group from the highest non-empty level; one
-- holding some takes more of that level only, up to the group size. So every handler holds
-- suspects of one level only, and a group that dies together climbs together (see reclaim.lua).
-- Atomic because a message must never be outside all of: the queue, the retry set, the suspect
-- lists, an in-flight set. Any key it writes that has the wrong type (garbage) is first renamed
-- aside to <key>:quarantine:<time_us> and an error entry says so: the data is kept, the system
-- goes on, and no write of this call can fail halfway.
local count = tonumber(ARGV[2])
local hb_ms = tonumber(ARGV[3])
local retry_max = tonumber(ARGV[4])
local held_level = tonumber(ARGV[5])
local held_count = tonumber(ARGV[6])
local base = tonumber(ARGV[7])
if not count or count < 1 or not hb_ms or hb_ms <= 0 or not retry_max or retry_max < 0
  or not held_level or not held_count or not base or base < 1
  or (held_level ~= 0 and (held_level < 2 or held_level > 6)) then
  return redis.error_reply('ERR fetch: bad arguments')
end
local gone = forgotten(KEYS[13], ARGV[8], KEYS[15])
if gone then return gone end
local now, now_us = redis_now()
guard('fetch', now, KEYS[5], KEYS[6], {
  {KEYS[1], 'list'}, {KEYS[2], 'set'}, {KEYS[3], 'set'}, {KEYS[4], 'string'}, {KEYS[7], 'set'},
  {KEYS[8], 'list'}, {KEYS[9], 'list'}, {KEYS[10], 'list'}, {KEYS[11], 'list'}, {KEYS[12], 'list'},
  {KEYS[14], 'hash'},
})
local lapsed = 0
if not redis.call('SET', KEYS[4], now, 'PX', hb_ms, 'GET') then
  lapsed = 1
end
local msgs = {}
local function group(level)
  return math.max(1, math.floor(base / 10 ^ (level - 1)))
end
local function take(level, n)
  if n <= 0 then return end
  local got = redis.call('LPOP', KEYS[8 + level - 2], n)
  if got then
    for _, p in ipairs(got) do msgs[#msgs + 1] = p end
  end
end
if held_level == 0 then
  for level = 6, 2, -1 do
    if redis.call('LLEN', KEYS[8 + level - 2]) > 0 then
      take(level, math.min(count, group(level)))
      break
    end
  end
else
  take(held_level, math.min(count, group(held_level) - held_count))
end
local want = math.min(retry_max, count - #msgs)
if want > 0 then
  for _, p in ipairs(redis.call('SPOP', KEYS[7], want)) do
    msgs[#msgs + 1] = p
  end
end
-- Fresh messages: the queue's head entries, each taking at least one message, so at most `want`
-- entries are looked at, 64 at a time.
want = count - #msgs
local batches, records = {}, {}
-- Set when a batch entry was split: its rest is the queue's head, so nothing after it is taken.
local split = false
while want > 0 do
  local asked = math.min(want, 64)
  local head = redis.call('LRANGE', KEYS[1], 0, asked - 1)
  if #head == 0 then break end
  local whole = 0
  for _, e in ipairs(head) do
    local first, n, epoch, gen = batch_entry(e)
    if not first then
      msgs[#msgs + 1] = e
      whole = whole + 1
      want = want - 1
    else
      local k = math.min(n, want)
      if k < n then
        -- Split so the rest starts on a multiple of 8 when it can: commit.lua combines a
        -- batch's bitmaps without shifting them then.
        if k > (first + k) % 8 then
          k = k - (first + k) % 8
        end
        split = true
        redis.call('LSET', KEYS[1], whole, '*' .. (first + k) .. ':' .. (n - k) .. ':' .. epoch .. ':' .. gen)
      else
        whole = whole + 1
      end
      batches[#batches + 1] = first .. ':' .. k .. ':' .. epoch .. ':' .. gen
      local mask = string.rep('\255', math.floor(k / 8))
      if k % 8 > 0 then
        mask = mask .. string.char(256 - 2 ^ (8 - k % 8))
      end
      records[#records + 1] = first
      records[#records + 1] = k .. ':' .. k .. ':' .. epoch .. ':' .. gen .. ':' .. mask
      want = want - k
    end
    if want == 0 or split then break end
  end
  if whole > 0 then
    redis.call('LPOP', KEYS[1], whole)
  end
  if #head < asked or split then break end
end
if #msgs == 0 and #batches == 0 then
  return {now_us, lapsed, 0}
end
in_chunks('SADD', KEYS[2], msgs)
in_chunks('HSET', KEYS[14], records)
redis.call('SADD', KEYS[3], ARGV[1])
local reply = {now_us, lapsed, #batches}
for _, b in ipairs(batches) do reply[#reply + 1] = b end
for _, p in ipairs(msgs) do reply[#reply + 1] = p end
return reply
