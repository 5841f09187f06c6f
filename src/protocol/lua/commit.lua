-- commit.lua: record the outcomes of a batch, each only if this handler still owns the message.
-- KEYS[1]: this handler's in-flight set ({ns}:inflight:<handler>)
-- KEYS[2]: outcome bitmap ({ns}:done): bit id = an outcome was recorded for id
-- KEYS[3]: success bitmap ({ns}:ok)
-- KEYS[4]: error store ({ns}:errors), list of "<payload>\t<reason>\t<time_us>"
-- KEYS[5]: stats hash ({ns}:stats)
-- KEYS[6]: incarnation ({ns}:incarnation)
-- KEYS[7]: this handler's batch records ({ns}:batches:<handler>), hash (see fetch.lua)
-- KEYS[8]: write counts ({ns}:writes), hash copy -> guarded calls (prelude.lua, forgotten)
-- A key it writes that has the wrong type is set aside first (an error entry names it), so no
-- write can fail after the first ownership change: an outcome is never half-recorded.
-- ARGV[1]: the guard "<token>/<copy>/<acked>": the incarnation token this copy joined, its copy id and its count of guarded calls seen to succeed (FORGOTTEN error, nothing written, otherwise)
-- ARGV[2]: g, integer >= 0: the number of batch groups that follow
-- ARGV[3 .. 2+3g]: per batch group (first_id, tokens, reasons), outcomes of messages of the batch
--   record first_id in KEYS[7]: tokens is a string of 3-byte big-endian numbers index*4 + kind
--   (index within the batch, < 2^22; kind 0 ok, 1 handler error, 2 handler timeout, 3 handler
--   error with its reason) and reasons the reasons of the kind-3 tokens, in order, joined by "\n"
--   (each one line). No argument object per message: this is what makes a commit cheap.
-- ARGV[3+3g ..]: triples (kind, payload, extra) for the messages of the in-flight set KEYS[1]:
--   kind "o": handled ok,      extra = id
--   kind "e": handler error,   extra = id, or "<id>\t<reason>" (one line; "handler error" when none)
--   kind "t": handler timeout (eventHandler did not call back in time), extra = id
--   kind "b": unparseable message (never handled), extra = reason
-- Returns: {time_us, refused, ...}: the Redis time of the commit, then the 1-based numbers of the
--   outcomes NOT recorded because this handler no longer owns the message (it was reclaimed and
--   re-queued after our heartbeat expired; another handler records it), counting every batch
--   group's tokens in order, then the triples. Usually just {time_us}.
-- Ownership is per message: SREM's answer for a payload, the record's mask bit for a batch
-- message (cleared as its outcome is recorded, so a retried commit records nothing twice; the
-- record goes when no bit is left). A second outcome for an id whose bit in KEYS[2] is already set
-- is counted as a duplicate and not recorded again. A batch group reads the batch's bytes of both
-- bitmaps once, changes them in Lua and writes them back once (SETRANGE), instead of a SETBIT
-- per message. Every argument is validated before anything is mutated.
local g = tonumber(ARGV[2])
if not ARGV[2] or not string.match(ARGV[2], '^%d+$') or #ARGV < 2 + 3 * g
  or (#ARGV - 2 - 3 * g) % 3 ~= 0 then
  return redis.error_reply('ERR commit: arguments must be the token, g, g batch groups, then (kind, payload, extra) triples')
end
local singles = 3 + 3 * g
for i = 3, singles - 1, 3 do
  if not string.match(ARGV[i], '^%d+$') or tonumber(ARGV[i]) >= 4294967296 or #ARGV[i + 1] % 3 ~= 0 then
    return redis.error_reply('ERR commit: bad batch group ' .. ARGV[i])
  end
end
for i = singles, #ARGV, 3 do
  local kind = ARGV[i]
  if kind == 'o' or kind == 'e' or kind == 't' then
    local digits = string.match(ARGV[i + 2], '^(%d+)$')
    if kind == 'e' and not digits then
      digits = string.match(ARGV[i + 2], '^(%d+)\t')
    end
    local id = tonumber(digits)
    if not id or id >= 4294967296 then
      return redis.error_reply('ERR commit: bad id ' .. ARGV[i + 2])
    end
  elseif kind ~= 'b' then
    return redis.error_reply('ERR commit: bad kind ' .. kind)
  end
end
local gone = forgotten(KEYS[6], ARGV[1], KEYS[8])
if gone then return gone end
local now, now_us = redis_now()
guard('commit', now, KEYS[4], KEYS[5], {{KEYS[1], 'set'}, {KEYS[2], 'string'}, {KEYS[3], 'string'}, {KEYS[7], 'hash'}})
local result = {now_us}
local processed, errors, bad, duplicates, runs, timeouts = 0, 0, 0, 0, 0, 0
local failed = {}
local function fail(entry)
  failed[#failed + 1] = entry
  if #failed == 1000 then
    redis.call('RPUSH', KEYS[4], unpack(failed))
    failed = {}
  end
end
-- A string's bytes as a table of numbers, and back: in slices, because string.byte and unpack
-- pass their values on Lua's C stack.
local function bytes(str, len)
  local t
  if #str <= 4000 then
    t = {string.byte(str, 1, #str)}
  else
    t = {}
    for from = 1, #str, 4000 do
      local slice = {string.byte(str, from, math.min(from + 3999, #str))}
      for k = 1, #slice do t[from + k - 1] = slice[k] end
    end
  end
  for i = #str + 1, len do t[i] = 0 end
  return t
end
local function text(t)
  local parts = {}
  for from = 1, #t, 4000 do
    parts[#parts + 1] = string.char(unpack(t, from, math.min(from + 3999, #t)))
  end
  return table.concat(parts)
end
local item = 0
local fmt = string.format
local POW = {[0] = 128, 64, 32, 16, 8, 4, 2, 1}
for i = 3, singles - 1, 3 do
  local first, tokens = tonumber(ARGV[i]), ARGV[i + 1]
  local reasons = {}
  for r in string.gmatch(ARGV[i + 2], '[^\n]+') do reasons[#reasons + 1] = r end
  local taken = 0
  local record = redis.call('HGET', KEYS[7], ARGV[i])
  local open, n, epoch, gen, at
  if record then
    open, n, epoch, gen, at = string.match(record, '^(%d+):(%d+):(%d+):(%d+):()')
  end
  if not open then
    -- Not ours (reclaimed while our heartbeat had lapsed), or a record we cannot read.
    for _ = 1, #tokens / 3 do
      item = item + 1
      result[#result + 1] = item
    end
    runs = runs + #tokens / 3
  else
    local n_s = n
    open, n = tonumber(open), tonumber(n)
    local prefix = ':' .. epoch .. ':' .. gen .. '\t'
    local timeout_tail = prefix .. 'handler timeout\t' .. now
    local error_tail = prefix .. 'handler error\t' .. now
    local mask = bytes(string.sub(record, at), math.ceil(n / 8))
    local lo, hi = math.floor(first / 8), math.floor((first + n - 1) / 8)
    local lo_s, hi_s = fmt('%d', lo), fmt('%d', hi)
    local done = bytes(redis.call('GETRANGE', KEYS[2], lo_s, hi_s), hi - lo + 1)
    local ok = bytes(redis.call('GETRANGE', KEYS[3], lo_s, hi_s), hi - lo + 1)
    local done_changed, ok_changed = false, false
    for from = 1, #tokens, 3999 do
      local tb = {string.byte(tokens, from, math.min(from + 3998, #tokens))}
      for j = 1, #tb, 3 do
        local t = tb[j] * 65536 + tb[j + 1] * 256 + tb[j + 2]
        local kind = t % 4
        local index = (t - kind) / 4
        local m = (index - index % 8) / 8 + 1
        local mbit = POW[index % 8]
        local mb = mask[m]
        if index >= n or mb % (mbit + mbit) < mbit then
          result[#result + 1] = item + (from + j + 1) / 3
          if kind == 3 then taken = taken + 1 end
        else
          mask[m] = mb - mbit
          open = open - 1
          local id = first + index
          local b = (id - id % 8) / 8 - lo + 1
          local bbit = POW[id % 8]
          local db = done[b]
          if db % (bbit + bbit) >= bbit then
            duplicates = duplicates + 1
            if kind == 3 then taken = taken + 1 end
          else
            done[b] = db + bbit
            done_changed = true
            if kind == 0 then
              ok[b] = ok[b] + bbit
              ok_changed = true
              processed = processed + 1
            elseif kind == 2 then
              fail(fmt('%d', id) .. timeout_tail)
              errors = errors + 1
              timeouts = timeouts + 1
            else
              if kind == 3 then
                taken = taken + 1
                fail(fmt('%d', id) .. prefix .. (reasons[taken] or 'handler error') .. '\t' .. now)
              else
                fail(fmt('%d', id) .. error_tail)
              end
              errors = errors + 1
            end
          end
        end
      end
    end
    item = item + #tokens / 3
    runs = runs + #tokens / 3
    if done_changed then redis.call('SETRANGE', KEYS[2], lo_s, text(done)) end
    if ok_changed then redis.call('SETRANGE', KEYS[3], lo_s, text(ok)) end
    if open <= 0 then
      redis.call('HDEL', KEYS[7], ARGV[i])
    else
      redis.call('HSET', KEYS[7], ARGV[i], fmt('%d:%s:%s:%s:', open, n_s, epoch, gen) .. text(mask))
    end
  end
end
for i = singles, #ARGV, 3 do
  local kind, payload, extra = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  item = item + 1
  local id, reason = extra, 'handler error'
  if kind == 'e' then
    local n, why = string.match(extra, '^(%d+)\t(.*)$')
    if n then id, reason = n, why end
  end
  if kind ~= 'b' then
    runs = runs + 1
  end
  if redis.call('SREM', KEYS[1], payload) == 0 then
    result[#result + 1] = item
  elseif kind == 'b' then
    fail(payload .. '\t' .. extra .. '\t' .. now)
    bad = bad + 1
  elseif redis.call('SETBIT', KEYS[2], id, 1) == 1 then
    duplicates = duplicates + 1
  elseif kind == 'o' then
    redis.call('SETBIT', KEYS[3], id, 1)
    processed = processed + 1
  elseif kind == 't' then
    fail(payload .. '\thandler timeout\t' .. now)
    errors = errors + 1
    timeouts = timeouts + 1
  else
    fail(payload .. '\t' .. reason .. '\t' .. now)
    errors = errors + 1
  end
end
if #failed > 0 then redis.call('RPUSH', KEYS[4], unpack(failed)) end
if processed > 0 then redis.call('HINCRBY', KEYS[5], 'processed', processed) end
if errors > 0 then redis.call('HINCRBY', KEYS[5], 'errors', errors) end
if bad > 0 then redis.call('HINCRBY', KEYS[5], 'bad', bad) end
if timeouts > 0 then redis.call('HINCRBY', KEYS[5], 'timeouts', timeouts) end
if duplicates > 0 then redis.call('HINCRBY', KEYS[5], 'duplicates', duplicates) end
if runs > 0 then redis.call('HINCRBY', KEYS[5], 'runs', runs) end
if #result > 1 then redis.call('HINCRBY', KEYS[5], 'refused', #result - 1) end
return result
