-- reclaim.lua: give the in-flight messages of dead handlers back, and set aside a poison message
-- (one that kills every handler holding it) after a bounded number of deliveries; or, asked by a
-- live handler whose copy became the generator, give that handler's own messages back (hand-back).
-- KEYS[1]: handler registry ({ns}:handlers), set of handler ids
-- KEYS[2]: retry set ({ns}:retry): messages reclaimed once
-- KEYS[3]: outcome bitmap ({ns}:done)
-- KEYS[4]: error store ({ns}:errors), list
-- KEYS[5]: stats hash ({ns}:stats)
-- KEYS[6..10]: suspect lists ({ns}:suspects:2 .. {ns}:suspects:6)
-- KEYS[11]: incarnation ({ns}:incarnation)
-- KEYS[12]: write counts ({ns}:writes), hash copy -> guarded calls (prelude.lua, forgotten)
-- KEYS[13]: returned records ({ns}:returned), hash first_id -> batch record: where a hand-back
--           puts the handler's batch records, whole, for fetch.lua
-- ARGV[1]: key prefix "{ns}:" — per-handler keys are derived here as <prefix>hb:<handler>,
--          <prefix>inflight:<handler> and <prefix>batches:<handler> (see fetch.lua). They are not declared in KEYS
--          because the set of handlers is only known inside the script; all share the {ns} hash
--          tag, so they live in the same cluster slot as KEYS[1].
-- ARGV[2]: max_reclaims, integer 3..7: a message reclaimed this many times is poison
-- ARGV[3]: the guard "<token>/<copy>/<acked>": the incarnation token this copy joined, its copy id and its count of guarded calls seen to succeed (FORGOTTEN error, nothing written, otherwise)
-- ARGV[4]: optional, a handler id: hand-back. Only that handler's messages are given back, live
--          or not, each with its reclaim count unchanged (it did not die holding them): its batch
--          records move whole (mask and all) to KEYS[13], its payloads to the retry set (or the
--          suspect list of their count) as they were; counted as handed_back, not reclaimed.
--          Absent or "": every dead handler, as below.
-- Returns: {handlers_reclaimed, messages_given_back, messages_poisoned}
-- The write count of a guarded call comes back beside this reply (scripts.rs, `guarded`).
--
-- A handler is dead when its heartbeat key has expired (SIGKILL runs no cleanup; the TTL is the
-- detector). Its batch records are expanded into the payloads of their open messages (mask bits
-- still set: the ones it committed never run again), "<id>:<epoch>:<generated_us>", which are
-- fresh (reclaim count 0), so they go to the retry set below. Each of its messages gets its reclaim count (the payload's 4th field) raised by one
-- and goes, by that count L:
--   1              → the retry set; fetch.lua takes random samples of it, so the messages that
--                    died together are spread over many handlers instead of dying together again;
--   2 .. 6         → the suspect list of level L, in order; fetch.lua hands them out in groups of
--                    base / 10^(L-1) (at least 1), a handler holding suspects of one level only.
--                    A handler that dies holding a group sends exactly that group up one level,
--                    where it is split into groups ten times smaller: a message that kills every
--                    handler holding it is alone in its group by level 6 (base 50,000), while
--                    the messages that shared its groups stop climbing as soon as they are in
--                    a group without it;
--   max_reclaims   → the error store with the reason, outcome bit set (counted as poisoned).
-- Atomic: a message is in exactly one of the dead handler's set, the retry set, a suspect list,
-- or the error store at every instant, and a late commit by the (paused, not dead) handler is
-- refused by commit.lua because SREM finds nothing. Keys of the wrong type (a dead handler's set
-- included) are set aside first, with an error entry naming them.
local prefix = ARGV[1]
local max_reclaims = tonumber(ARGV[2])
if not prefix or prefix == '' or not max_reclaims or max_reclaims < 3 or max_reclaims > 7 then
  return redis.error_reply('ERR reclaim: bad arguments')
end
local own = ARGV[4] or ''
local gone = forgotten(KEYS[11], ARGV[3], KEYS[12])
if gone then return gone end
local now = redis_now()
guard('reclaim', now, KEYS[4], KEYS[5], {
  {KEYS[1], 'set'}, {KEYS[2], 'set'}, {KEYS[3], 'string'},
  {KEYS[6], 'list'}, {KEYS[7], 'list'}, {KEYS[8], 'list'}, {KEYS[9], 'list'}, {KEYS[10], 'list'},
  {KEYS[13], 'hash'},
})
-- The envelope of a payload, as src/protocol/message.rs reads it: id, epoch, time, reclaims
-- (0 when absent) and the data with its leading colon ('' when none); nil for garbage.
local function envelope(p)
  local id, epoch, gen, rest = string.match(p, '^(%d+):(%d+):(%d+)(.*)$')
  if not id or tonumber(id) > 4294967295 then
    return nil
  end
  if rest == '' then
    return id, epoch, gen, 0, ''
  end
  local n, data = string.match(rest, '^:(%d+)(.*)$')
  if not n or (data ~= '' and string.sub(data, 1, 1) ~= ':') then
    return nil
  end
  return id, epoch, gen, tonumber(n), data
end
local dead, moved, poisoned, duplicates = 0, 0, 0, 0
local handlers = own ~= '' and {own} or redis.call('SMEMBERS', KEYS[1])
for _, h in ipairs(handlers) do
  if own ~= '' or redis.call('EXISTS', prefix .. 'hb:' .. h) == 0 then
    local set = prefix .. 'inflight:' .. h
    local records = prefix .. 'batches:' .. h
    guard('reclaim', now, KEYS[4], KEYS[5], {{set, 'set'}, {records, 'hash'}})
    local retry, suspects = {}, {}
    local held = redis.call('SMEMBERS', set)
    local fields = redis.call('HGETALL', records)
    for f = 1, #fields, 2 do
      local first = tonumber(fields[f])
      local open, n, epoch, gen, at = string.match(fields[f + 1], '^(%d+):(%d+):(%d+):(%d+):()')
      if not first or not open then
        -- Unreadable (someone wrote it): kept for a person in the error store, counted bad.
        redis.call('RPUSH', KEYS[4], records .. ' ' .. fields[f] .. '\treclaim: unreadable batch record "'
          .. string.sub(fields[f + 1], 1, 60) .. '"\t' .. now)
        redis.call('HINCRBY', KEYS[5], 'bad', 1)
      elseif own ~= '' then
        -- A hand-back moves the record whole: its open messages stay a bitmap, so giving back
        -- and taking again cost per record, not per message.
        if tonumber(open) > 0 then
          redis.call('HSET', KEYS[13], fields[f], fields[f + 1])
          moved = moved + tonumber(open)
        end
      else
        local mask = string.sub(fields[f + 1], at)
        for i = 0, math.min(tonumber(n), #mask * 8) - 1 do
          local byte = string.byte(mask, math.floor(i / 8) + 1)
          if bit.band(byte, bit.lshift(1, 7 - i % 8)) ~= 0 then
            held[#held + 1] = (first + i) .. ':' .. epoch .. ':' .. gen
          end
        end
      end
    end
    for _, p in ipairs(held) do
      local id, epoch, gen, n, data = envelope(p)
      if not id then
        retry[#retry + 1] = p -- garbage: the next handler commits it as bad
      else
        -- A hand-back gives the message back exactly as it was held.
        local reclaims = own ~= '' and n or n + 1
        local again = own ~= '' and p or (id .. ':' .. epoch .. ':' .. gen .. ':' .. reclaims .. data)
        if reclaims >= max_reclaims then
          if redis.call('SETBIT', KEYS[3], id, 1) == 1 then
            duplicates = duplicates + 1
          else
            redis.call('RPUSH', KEYS[4], again .. '\tpoison: its handler died ' .. reclaims .. ' times while holding it\t' .. now)
            poisoned = poisoned + 1
          end
        elseif reclaims <= 1 then
          retry[#retry + 1] = again
        else
          suspects[reclaims] = suspects[reclaims] or {}
          table.insert(suspects[reclaims], again)
          moved = moved + 1
        end
      end
    end
    in_chunks('SADD', KEYS[2], retry)
    for level, list in pairs(suspects) do
      in_chunks('RPUSH', KEYS[6 + level - 2], list)
    end
    redis.call('DEL', set, records)
    redis.call('SREM', KEYS[1], h)
    dead = dead + 1
    moved = moved + #retry
  end
end
if moved > 0 then redis.call('HINCRBY', KEYS[5], own ~= '' and 'handed_back' or 'reclaimed', moved) end
if poisoned > 0 then redis.call('HINCRBY', KEYS[5], 'poisoned', poisoned) end
if duplicates > 0 then redis.call('HINCRBY', KEYS[5], 'duplicates', duplicates) end
return {dead, moved, poisoned}
