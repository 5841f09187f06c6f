-- commit.lua: record the outcomes of a batch, each only if this handler still owns the message.
-- KEYS[1]: this handler's in-flight set ({ns}:inflight:<handler>)
-- KEYS[2]: outcome bitmap ({ns}:done): bit id = an outcome was recorded for id
-- KEYS[3]: success bitmap ({ns}:ok)
-- KEYS[4]: error store ({ns}:errors), list of "<payload>\t<reason>\t<time_us>"
-- KEYS[5]: stats hash ({ns}:stats)
-- KEYS[6]: incarnation ({ns}:incarnation)
-- KEYS[7]: this handler's batch records ({ns}:batches:<handler>), hash (see fetch.lua)
-- KEYS[8]: write counts ({ns}:writes), hash copy -> guarded calls (prelude.lua, forgotten)
-- KEYS[9..14]: scratch strings ({ns}:scratch:1 .. 6): the call works on bitmaps with BITOP in
--   them and deletes them before it returns; they are never replicated or written to the AOF
--   (redis.set_repl), so a replica or a restart never sees one.
-- A key it writes that has the wrong type is set aside first (an error entry names it), so no
-- write can fail after the first ownership change: an outcome is never half-recorded.
-- ARGV[1]: the guard "<token>/<copy>/<acked>": the incarnation token this copy joined, its copy id and its count of guarded calls seen to succeed (FORGOTTEN error, nothing written, otherwise)
-- ARGV[2]: g, integer >= 0: the number of batch groups that follow
-- ARGV[3 .. 2+5g]: per batch group (first_id, sel, oks, errs, reasons), the outcomes of messages
--   of the batch record first_id in KEYS[7]:
--   sel:     bitmap of the batch's indexes (bit i, MSB first, is message first_id+i, as in the
--            record's mask) that have an outcome in this call;
--   oks:     bitmap of those handled ok, a subset of sel;
--   errs:    3-byte big-endian tokens index*4 + kind, one for each other bit of sel, in
--            increasing index order (kind 1 handler error, 2 handler timeout, 3 handler error
--            with its reason);
--   reasons: the reasons of the kind-3 tokens, in token order, joined by "\n" (each one line).
--   No argument, and no Lua work, per ok message: bitmaps are combined with BITOP, in C.
-- ARGV[3+5g ..]: triples (kind, payload, extra) for the messages of the in-flight set KEYS[1]:
--   kind "o": handled ok,      extra = id
--   kind "e": handler error,   extra = id, or "<id>\t<reason>" (one line; "handler error" when none)
--   kind "t": handler timeout (eventHandler did not call back in time), extra = id
--   kind "b": unparseable message (never handled), extra = reason
-- Returns: {time_us, r, id_1 .. id_r, item, ...}: the Redis time of the commit; the r ids of batch
--   messages whose outcomes were NOT recorded because this handler no longer owns them (reclaimed
--   and re-queued after our heartbeat expired; another handler records them); then the 1-based
--   numbers of the triples not recorded, likewise. Usually just {time_us, 0}.
-- Ownership is per message: SREM's answer for a payload, the record's mask bit for a batch
-- message (cleared as its outcome is recorded, so a retried commit records nothing twice; the
-- record goes when no bit is left). A second outcome for an id whose bit in KEYS[2] is already set
-- is counted as a duplicate and not recorded again.
-- The batch groups are worked on in spans of the id space: aligned batches (first id a multiple
-- of 8, which generate.lua and fetch.lua make the rule) side by side, up to 64 KiB of bitmap per
-- span; any other batch alone, its bitmaps shifted into id space in Lua. Per span, in C:
-- owned = masks AND sel, duplicates = owned AND the span's bytes of KEYS[2], recorded = owned XOR
-- duplicates; the span's bytes of KEYS[2] and KEYS[3] are read once (GETRANGE), ORed and written
-- back once (SETRANGE). So a commit's Redis commands are per span and per group, not per message.
-- Every argument is validated before anything is mutated.
local g = tonumber(ARGV[2])
if not ARGV[2] or not string.match(ARGV[2], '^%d+$') or #ARGV < 2 + 5 * g
  or (#ARGV - 2 - 5 * g) % 3 ~= 0 then
  return redis.error_reply('ERR commit: arguments must be the guard, g, g batch groups of 5, then (kind, payload, extra) triples')
end
local singles = 3 + 5 * g
local POW = {[0] = 128, 64, 32, 16, 8, 4, 2, 1}
local SPAN_MAX = 65536
local S1, S2, S3, S4, S5, S6 = KEYS[9], KEYS[10], KEYS[11], KEYS[12], KEYS[13], KEYS[14]
local function scratch_clear()
  redis.set_repl(redis.REPL_NONE)
  redis.call('DEL', S1, S2, S3, S4, S5, S6)
end
-- Scratch work is this call's own: not replicated, not in the AOF. Only data writes are.
redis.set_repl(redis.REPL_NONE)
local function zeros(n)
  return string.rep('\0', n)
end
-- Whether bit i (0-based, MSB first) of string str is set.
local function has(str, i)
  local b = string.byte(str, (i - i % 8) / 8 + 1)
  return b ~= nil and b % (POW[i % 8] * 2) >= POW[i % 8]
end
-- Validation: the groups in first-id order; every error token in its group's sel and not in its
-- oks, in increasing index order; and, over all groups at once (their bitmaps side by side),
-- oks a subset of sel and every other bit of sel covered by a token.
local groups = {}
local all_sel, all_oks, errs_total = {}, {}, 0
for i = 3, singles - 1, 5 do
  local sel, oks, errs = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if not string.match(ARGV[i], '^%d+$') or tonumber(ARGV[i]) >= 4294967296 or #errs % 3 ~= 0
    or #oks > #sel or #sel > 524288 then
    scratch_clear()
    return redis.error_reply('ERR commit: bad batch group ' .. ARGV[i])
  end
  local prev = -1
  for j = 1, #errs, 3 do
    local a, b, c = string.byte(errs, j, j + 2)
    local t = a * 65536 + b * 256 + c
    local index = (t - t % 4) / 4
    local m, bit = (index - index % 8) / 8 + 1, POW[index % 8]
    local sb, ob = string.byte(sel, m) or 0, string.byte(oks, m) or 0
    if t % 4 == 0 or index <= prev or sb % (bit + bit) < bit or ob % (bit + bit) >= bit then
      scratch_clear()
      return redis.error_reply('ERR commit: group ' .. ARGV[i] .. ': error token for index ' .. index
        .. ' is kind 0, out of order, not in sel or also in oks')
    end
    prev = index
  end
  groups[#groups + 1] = {i = i, first = tonumber(ARGV[i])}
  all_sel[#all_sel + 1] = sel
  all_oks[#all_oks + 1] = oks .. zeros(#sel - #oks)
  errs_total = errs_total + #errs / 3
end
table.sort(groups, function(a, b) return a.first < b.first end)
for k = 2, #groups do
  if groups[k].first == groups[k - 1].first then
    scratch_clear()
    return redis.error_reply('ERR commit: batch group ' .. groups[k].first .. ' given twice')
  end
end
local runs = 0
if #groups > 0 then
  redis.call('SET', S1, table.concat(all_sel))
  redis.call('SET', S2, table.concat(all_oks))
  local nsel, nok = redis.call('BITCOUNT', S1), redis.call('BITCOUNT', S2)
  redis.call('BITOP', 'AND', S3, S1, S2)
  if redis.call('BITCOUNT', S3) ~= nok or nsel ~= nok + errs_total then
    scratch_clear()
    return redis.error_reply('ERR commit: oks must be a subset of sel and every other bit of sel have an error token')
  end
  runs = nsel
end
all_sel, all_oks = nil, nil
for i = singles, #ARGV, 3 do
  local kind = ARGV[i]
  if kind == 'o' or kind == 'e' or kind == 't' then
    local digits = string.match(ARGV[i + 2], '^(%d+)$')
    if kind == 'e' and not digits then
      digits = string.match(ARGV[i + 2], '^(%d+)\t')
    end
    local id = tonumber(digits)
    if not id or id >= 4294967296 then
      scratch_clear()
      return redis.error_reply('ERR commit: bad id ' .. ARGV[i + 2])
    end
  elseif kind ~= 'b' then
    scratch_clear()
    return redis.error_reply('ERR commit: bad kind ' .. kind)
  end
end
redis.set_repl(redis.REPL_ALL)
local gone = forgotten(KEYS[6], ARGV[1], KEYS[8])
if gone then
  scratch_clear()
  return gone
end
local now, now_us = redis_now()
guard('commit', now, KEYS[4], KEYS[5], {{KEYS[1], 'set'}, {KEYS[2], 'string'}, {KEYS[3], 'string'}, {KEYS[7], 'hash'}})
local refused_ids = {}
local processed, errors, bad, duplicates, timeouts = 0, 0, 0, 0, 0
local failed = {}
local function fail(entry)
  failed[#failed + 1] = entry
  if #failed == 1000 then
    redis.call('RPUSH', KEYS[4], unpack(failed))
    failed = {}
  end
end
-- A string's bytes as a table of numbers (len of them, zero-padded), and back: in slices,
-- because string.byte and unpack pass their values on Lua's C stack.
local function bytes(str, len)
  local t = {}
  for from = 1, #str, 4000 do
    local slice = {string.byte(str, from, math.min(from + 3999, #str))}
    for k = 1, #slice do t[from + k - 1] = slice[k] end
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
-- Index space (bit i = message first+i) to id space (bit k = id 8*floor(first/8) + k), len bytes,
-- for a batch whose first id is s bits into its first byte; and back (len bytes of index space).
local function to_ids(str, s, len)
  if s == 0 then
    return string.sub(str, 1, len) .. zeros(len - #str)
  end
  local b, out, div, mul, prev = bytes(str, len), {}, 2 ^ s, 2 ^ (8 - s), 0
  for q = 1, len do
    local cur = b[q]
    out[q] = (prev % div) * mul + (cur - cur % div) / div
    prev = cur
  end
  return text(out)
end
local function to_index(str, s, len)
  if s == 0 then
    return string.sub(str, 1, len)
  end
  local b, out, div, mul = bytes(str, len + 1), {}, 2 ^ (8 - s), 2 ^ s
  for j = 1, len do
    local nxt = b[j + 1]
    out[j] = (b[j] % div) * mul + (nxt - nxt % div) / div
  end
  return text(out)
end
-- Appends base+p to refused_ids for each bit p set in str and not in sub (a subset of str, at
-- least as long, or nil for none).
local function refuse(base, str, sub)
  for j = 1, #str do
    local extra = string.byte(str, j) - (sub and string.byte(sub, j) or 0)
    if extra > 0 then
      for k = 0, 7 do
        if extra % (POW[k] * 2) >= POW[k] then
          refused_ids[#refused_ids + 1] = base + (j - 1) * 8 + k
        end
      end
    end
  end
end
local fmt = string.format
-- Read every group's record at once, then cut the groups with one into spans.
local spans, span = {}, nil
for from = 1, #groups, 1000 do
  local fields = {}
  for k = from, math.min(from + 999, #groups) do fields[#fields + 1] = ARGV[groups[k].i] end
  local records = redis.call('HMGET', KEYS[7], unpack(fields))
  for k = from, math.min(from + 999, #groups) do
    local gr, record = groups[k], records[k - from + 1]
    local open, n, epoch, gen, at
    if record then
      open, n, epoch, gen, at = string.match(record, '^(%d+):(%d+):(%d+):(%d+):()')
    end
    local sel = ARGV[gr.i + 1]
    if not open or tonumber(n) < 1 or tonumber(n) > 4194304 then
      -- Not ours (reclaimed while our heartbeat had lapsed), or a record we cannot read.
      refuse(gr.first, sel, nil)
    else
      gr.n_s, gr.epoch, gr.gen = n, epoch, gen
      n = tonumber(n)
      gr.n = n
      local width = math.ceil(n / 8)
      local mask = string.sub(record, at, at + width - 1)
      mask = mask .. zeros(width - #mask)
      local oks = ARGV[gr.i + 2]
      if #sel > width then
        -- Indexes past the record's mask were never this handler's.
        refuse(gr.first + 8 * width, string.sub(sel, width + 1), nil)
        sel, oks = string.sub(sel, 1, width), string.sub(oks, 1, width)
      end
      gr.s = gr.first % 8
      gr.lo = (gr.first - gr.s) / 8
      gr.len = math.floor((gr.first + n - 1) / 8) - gr.lo + 1
      gr.width = width
      gr.mask, gr.sel, gr.oks = to_ids(mask, gr.s, gr.len), to_ids(sel, gr.s, gr.len), to_ids(oks, gr.s, gr.len)
      if not span or gr.s ~= 0 or span.unaligned or gr.lo < span.hi + 1
        or gr.lo + gr.len - span.lo > SPAN_MAX then
        span = {lo = gr.lo, hi = gr.lo - 1, unaligned = gr.s ~= 0, groups = {}}
        spans[#spans + 1] = span
      end
      gr.off = gr.lo - span.lo
      span.groups[#span.groups + 1] = gr
      span.hi = gr.lo + gr.len - 1
    end
  end
end
local set_fields, del_fields = {}, {}
for _, sp in ipairs(spans) do
  local m, sl, ok_parts, at = {}, {}, {}, sp.lo
  for _, gr in ipairs(sp.groups) do
    local gap = zeros(gr.lo - at)
    m[#m + 1], sl[#sl + 1], ok_parts[#ok_parts + 1] = gap .. gr.mask, gap .. gr.sel, gap .. gr.oks
    at = gr.lo + gr.len
  end
  local sel_str = table.concat(sl)
  redis.set_repl(redis.REPL_NONE)
  redis.call('SET', S1, table.concat(m))
  redis.call('SET', S2, sel_str)
  redis.call('BITOP', 'AND', S3, S1, S2)
  local owned = redis.call('BITCOUNT', S3)
  local rec
  if owned < redis.call('BITCOUNT', S2) then
    rec = redis.call('GET', S3) or ''
    refuse(8 * sp.lo, sel_str, rec)
  end
  if owned > 0 then
    local lo_s, hi_s = fmt('%d', sp.lo), fmt('%d', sp.hi)
    redis.call('BITOP', 'XOR', S1, S1, S3)
    local masks = redis.call('GET', S1)
    for _, gr in ipairs(sp.groups) do
      local open = redis.call('BITCOUNT', S1, gr.off, gr.off + gr.len - 1)
      local field = ARGV[gr.i]
      if open == 0 then
        del_fields[#del_fields + 1] = field
      else
        set_fields[#set_fields + 1] = field
        set_fields[#set_fields + 1] = fmt('%d:%s:%s:%s:', open, gr.n_s, gr.epoch, gr.gen)
          .. to_index(string.sub(masks, gr.off + 1, gr.off + gr.len), gr.s, gr.width)
      end
    end
    redis.call('SET', S4, redis.call('GETRANGE', KEYS[2], lo_s, hi_s))
    redis.call('BITOP', 'AND', S2, S4, S3)
    local dups = redis.call('BITCOUNT', S2)
    if dups > 0 then
      redis.call('BITOP', 'XOR', S3, S3, S2)
      rec = redis.call('GET', S3)
    end
    redis.call('BITOP', 'OR', S4, S4, S3)
    local new_done = redis.call('GET', S4)
    redis.call('SET', S5, table.concat(ok_parts))
    redis.call('BITOP', 'AND', S5, S5, S3)
    local oked = redis.call('BITCOUNT', S5)
    local new_ok
    if oked > 0 then
      redis.call('SET', S6, redis.call('GETRANGE', KEYS[3], lo_s, hi_s))
      redis.call('BITOP', 'OR', S6, S6, S5)
      new_ok = redis.call('GET', S6)
    end
    redis.set_repl(redis.REPL_ALL)
    redis.call('SETRANGE', KEYS[2], lo_s, new_done)
    if new_ok then redis.call('SETRANGE', KEYS[3], lo_s, new_ok) end
    processed = processed + oked
    duplicates = duplicates + dups
    -- Error entries for the recorded failures (all of them, unless some were refused or
    -- duplicates: then the recorded bitmap says which).
    for _, gr in ipairs(sp.groups) do
      local errs = ARGV[gr.i + 3]
      if #errs > 0 then
        local prefix = ':' .. gr.epoch .. ':' .. gr.gen .. '\t'
        local timeout_tail = prefix .. 'handler timeout\t' .. now
        local error_tail = prefix .. 'handler error\t' .. now
        local reasons, taken = {}, 0
        for r in string.gmatch(ARGV[gr.i + 4], '[^\n]+') do reasons[#reasons + 1] = r end
        local base = 8 * sp.lo - gr.first
        for j = 1, #errs, 3 do
          local a, b, c = string.byte(errs, j, j + 2)
          local t = a * 65536 + b * 256 + c
          local kind = t % 4
          local index = (t - kind) / 4
          if kind == 3 then taken = taken + 1 end
          if index < gr.n and (not rec or has(rec, index - base)) then
            local id = gr.first + index
            if kind == 2 then
              fail(fmt('%d', id) .. timeout_tail)
              timeouts = timeouts + 1
            elseif kind == 3 then
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
end
redis.set_repl(redis.REPL_ALL)
in_chunks('HSET', KEYS[7], set_fields)
in_chunks('HDEL', KEYS[7], del_fields)
local result = {now_us, #refused_ids}
for _, id in ipairs(refused_ids) do result[#result + 1] = id end
local item = 0
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
if #result > 2 then redis.call('HINCRBY', KEYS[5], 'refused', #result - 2) end
redis.set_repl(redis.REPL_NONE)
scratch_clear()
return result
