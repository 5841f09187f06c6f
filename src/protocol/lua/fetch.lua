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
-- KEYS[16]: returned records ({ns}:returned), hash first_id -> batch record (format of KEYS[14]):
--           records a live handler gave back when its copy became the generator (reclaim.lua)
-- ARGV[1]: handler id
-- ARGV[2]: count, integer >= 1: messages to take in all
-- ARGV[3]: heartbeat_ms, integer > 0 (a fetch is proof of life: it refreshes the heartbeat)
-- ARGV[4]: retry_max, integer >= 0: at most this many from the retry set (SPOP: a random sample,
--          so messages that died together are not fetched together again)
-- ARGV[5]: held_level: the level (2..6) of the suspects the handler holds, 0 if none
-- ARGV[6]: held_count: how many suspects it holds
-- ARGV[7]: suspect_base, integer >= 1: the group size at level L is max(1, base / 10^(L-1))
-- ARGV[8]: the guard "<token>/<copy>/<acked>": the incarnation token this copy joined, its copy id and its count of guarded calls seen to succeed (FORGOTTEN error, nothing written, otherwise)
-- Returns: {time_us, lapsed, b, batch_1 .. batch_b, r, first_1, record_1 .. first_r, record_r,
--   payload, payload, ...}: the b batches taken from the queue as
--   "<first_id>:<count>:<epoch>:<generated_us>" (now records in KEYS[14], every message open),
--   the r records taken from KEYS[16] (now in KEYS[14] as they were: only their open messages
--   are this handler's), then the single payloads (now members of KEYS[2]);
--   lapsed is 1 when the heartbeat key was absent before this call refreshed it: the handler's
--   heartbeat had expired, so reclaim.lua may have taken its in-flight set, and the handler must
--   reconcile what it holds with its set (docs/PROTOCOL.md, invariant 5).
-- Returned records come before the queue (their messages are older), each taken whole when its
-- open messages fit in what is left of count; when none fits, one is split at a byte of its mask
-- (its first bytes taken, the rest left as a record of its own).
-- A batch entry of the queue (generate.lua) is taken whole when it fits in what is left of
-- count; otherwise its head is taken and the entry left at the head of the queue with the rest
-- (which starts on a multiple of 8 when the head can be cut there: the call may then take up to
-- 7 fewer than count).
-- Suspects come first: a handler holding none takes a group from the highest non-empty level; one
-- holding some takes more of that level only, up to the group size. So every handler holds
-- suspects of one level only, and a group that dies together climbs together (see reclaim.lua).
-- Atomic because a message must never be outside all of: the queue, the retry set, the suspect
-- lists, the returned records, an in-flight set or batch record. Any key it writes that has the wrong type (garbage) is first renamed
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
  {KEYS[14], 'hash'}, {KEYS[16], 'hash'},
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
local records, taken = {}, {}
-- Returned records: random samples of 16; bounded, since every round takes one or stops.
want = count - #msgs
local POP = {}
for b = 0, 255 do
  local n, v = 0, b
  while v > 0 do n = n + v % 2; v = math.floor(v / 2) end
  POP[b] = n
end
while want > 0 and redis.call('HLEN', KEYS[16]) > 0 do
  local sample = redis.call('HRANDFIELD', KEYS[16], 16, 'WITHVALUES')
  local took = false
  local widest
  for i = 1, #sample, 2 do
    local field, value = sample[i], sample[i + 1]
    local open, n, epoch, gen, at = string.match(value, '^(%d+):(%d+):(%d+):(%d+):()')
    local first = tonumber(field)
    if not open or not first then
      -- Unreadable (someone wrote it): kept for a person in the error store, counted bad.
      redis.call('HDEL', KEYS[16], field)
      redis.call('RPUSH', KEYS[5], KEYS[16] .. ' ' .. field .. '\tfetch: unreadable returned record "'
        .. string.sub(value, 1, 60) .. '"\t' .. now)
      redis.call('HINCRBY', KEYS[6], 'bad', 1)
    elseif tonumber(open) <= want then
      redis.call('HDEL', KEYS[16], field)
      records[#records + 1] = field
      records[#records + 1] = value
      taken[#taken + 1] = field
      taken[#taken + 1] = value
      want = want - tonumber(open)
      took = true
      if want == 0 then break end
    elseif not widest then
      widest = {field, first, n, epoch, gen, string.sub(value, at)}
    end
  end
  if not took then
    -- None fits: split one at a byte of its mask, its first bytes taken (as many as fit).
    if not widest or want < 8 then break end
    local field, first, n, epoch, gen, mask = unpack(widest)
    local bytes, bits = 0, 0
    while bytes < #mask and bits + POP[string.byte(mask, bytes + 1)] <= want do
      bits = bits + POP[string.byte(mask, bytes + 1)]
      bytes = bytes + 1
    end
    if bytes == 0 then break end
    local head = bits .. ':' .. (8 * bytes) .. ':' .. epoch .. ':' .. gen .. ':' .. string.sub(mask, 1, bytes)
    local rest_open = 0
    for j = bytes + 1, #mask do rest_open = rest_open + POP[string.byte(mask, j)] end
    redis.call('HDEL', KEYS[16], field)
    if rest_open > 0 then
      redis.call('HSET', KEYS[16], first + 8 * bytes, rest_open .. ':' .. (tonumber(n) - 8 * bytes)
        .. ':' .. epoch .. ':' .. gen .. ':' .. string.sub(mask, bytes + 1))
    end
    if bits > 0 then
      records[#records + 1] = field
      records[#records + 1] = head
      taken[#taken + 1] = field
      taken[#taken + 1] = head
      want = want - bits
    end
    break
  end
end
-- Fresh messages: the queue's head entries, each taking at least one message, so at most `want`
-- entries are looked at, 64 at a time.
local batches = {}
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
if #msgs == 0 and #batches == 0 and #taken == 0 then
  return {now_us, lapsed, 0, 0}
end
in_chunks('SADD', KEYS[2], msgs)
in_chunks('HSET', KEYS[14], records)
redis.call('SADD', KEYS[3], ARGV[1])
local reply = {now_us, lapsed, #batches}
for _, b in ipairs(batches) do reply[#reply + 1] = b end
reply[#reply + 1] = #taken / 2
for _, t in ipairs(taken) do reply[#reply + 1] = t end
for _, p in ipairs(msgs) do reply[#reply + 1] = p end
return reply
