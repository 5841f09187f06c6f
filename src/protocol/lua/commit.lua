-- commit.lua: record the outcomes of a batch, each only if this handler still owns the message.
-- KEYS[1]: this handler's in-flight set ({ns}:inflight:<handler>)
-- KEYS[2]: outcome bitmap ({ns}:done): bit id = an outcome was recorded for id
-- KEYS[3]: success bitmap ({ns}:ok)
-- KEYS[4]: error store ({ns}:errors), list of "<payload>\t<reason>\t<time_us>"
-- KEYS[5]: stats hash ({ns}:stats)
-- KEYS[6]: incarnation ({ns}:incarnation)
-- A key it writes that has the wrong type is set aside first (an error entry names it), so no
-- write can fail after the SREMs: an outcome is never half-recorded.
-- ARGV[1]: the incarnation token this copy joined (FORGOTTEN error, nothing written, otherwise)
-- ARGV[2..]: triples (kind, payload, extra):
--   kind "o": handled ok,      extra = id
--   kind "e": handler error,   extra = id, or "<id>\t<reason>" (one line; "handler error" when none)
--   kind "t": handler timeout (eventHandler did not call back in time), extra = id
--   kind "b": unparseable message (never handled), extra = reason
-- Returns: {time_us, refused_index, ...}: the Redis time of the commit, then the 1-based triple
--   numbers NOT recorded because this handler no longer owns the payload (it was reclaimed and
--   re-queued after our heartbeat expired; another handler records it). Usually just {time_us}.
-- Ownership is SREM's answer: the payload leaves the in-flight set exactly once. A second outcome
-- for an id whose bit in KEYS[2] is already set is counted as a duplicate and not recorded again.
-- Every argument is validated before anything is mutated.
if #ARGV % 3 ~= 1 then
  return redis.error_reply('ERR commit: arguments must be the token, then (kind, payload, extra) triples')
end
for i = 2, #ARGV, 3 do
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
local gone = forgotten(KEYS[6], ARGV[1])
if gone then return gone end
local now, now_us = redis_now()
guard('commit', now, KEYS[4], KEYS[5], {{KEYS[1], 'set'}, {KEYS[2], 'string'}, {KEYS[3], 'string'}})
local result = {now_us}
local processed, errors, bad, duplicates, runs, timeouts = 0, 0, 0, 0, 0, 0
for i = 2, #ARGV, 3 do
  local kind, payload, extra = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local id, reason = extra, 'handler error'
  if kind == 'e' then
    local n, why = string.match(extra, '^(%d+)\t(.*)$')
    if n then id, reason = n, why end
  end
  if kind ~= 'b' then
    runs = runs + 1
  end
  if redis.call('SREM', KEYS[1], payload) == 0 then
    result[#result + 1] = (i + 1) / 3
  elseif kind == 'b' then
    redis.call('RPUSH', KEYS[4], payload .. '\t' .. extra .. '\t' .. now)
    bad = bad + 1
  elseif redis.call('SETBIT', KEYS[2], id, 1) == 1 then
    duplicates = duplicates + 1
  elseif kind == 'o' then
    redis.call('SETBIT', KEYS[3], id, 1)
    processed = processed + 1
  elseif kind == 't' then
    redis.call('RPUSH', KEYS[4], payload .. '\thandler timeout\t' .. now)
    errors = errors + 1
    timeouts = timeouts + 1
  else
    redis.call('RPUSH', KEYS[4], payload .. '\t' .. reason .. '\t' .. now)
    errors = errors + 1
  end
end
if processed > 0 then redis.call('HINCRBY', KEYS[5], 'processed', processed) end
if errors > 0 then redis.call('HINCRBY', KEYS[5], 'errors', errors) end
if bad > 0 then redis.call('HINCRBY', KEYS[5], 'bad', bad) end
if timeouts > 0 then redis.call('HINCRBY', KEYS[5], 'timeouts', timeouts) end
if duplicates > 0 then redis.call('HINCRBY', KEYS[5], 'duplicates', duplicates) end
if runs > 0 then redis.call('HINCRBY', KEYS[5], 'runs', runs) end
if #result > 1 then redis.call('HINCRBY', KEYS[5], 'refused', #result - 1) end
return result
