-- generate.lua: getMessage() for a batch: fenced, gap-free ids appended to the queue.
-- KEYS[1]: lease key ({ns}:lease)
-- KEYS[2]: next id ({ns}:next_id), integer, absent = 0
-- KEYS[3]: max messages ({ns}:max), integer, absent = unlimited
-- KEYS[4]: queue ({ns}:queue), list of batch entries "*<first_id>:<count>:<epoch>:<generated_us>"
--          (messages without data) and payloads "<id>:<epoch>:<generated_us>:0:<data>" (with data)
-- KEYS[5]: epoch log ({ns}:epochs), list of "<epoch>:<first_id>:<count>:<time_us>"
-- KEYS[6]: stats hash ({ns}:stats)
-- KEYS[7]: wake-up channel ({ns}:wake): PUBLISHed the count after a batch, for idle handlers
-- KEYS[8]: incarnation ({ns}:incarnation)
-- KEYS[9]: error store ({ns}:errors), for entries naming keys of the wrong type set aside
-- KEYS[10]: write counts ({ns}:writes), hash copy -> guarded calls (prelude.lua, forgotten)
-- ARGV[1]: our lease value "<epoch>:<instance>"
-- ARGV[2]: our epoch (integer)
-- ARGV[3]: batch_max, integer >= 1: at most this many messages (a batch cut short by queue_max
--          ends on a multiple of 8 when it can: up to 7 fewer than there is room for)
-- ARGV[4]: queue_max, integer >= 1: generate only while the queue holds fewer messages (its
--          ids are contiguous, so that is next_id minus the head entry's first id)
-- ARGV[5]: the guard "<token>/<copy>/<acked>": the incarnation token this copy joined, its copy id and its count of guarded calls seen to succeed
-- ARGV[6]: min_next_id, integer >= 0: the highest next id this copy has seen. A lower next_id
--          means Redis went back in time (restored from an older copy): FORGOTTEN, nothing written.
-- ARGV[7]: id_limit, integer >= 1: ids are 0 .. id_limit-1 (the outcome bitmaps' size); never
--          generate past it.
-- ARGV[8]: "" when the messages carry no data; otherwise the id the data below begins at (the
--          caller asked its source for the ids it believes come next).
-- ARGV[9..]: the data of the messages ARGV[8], ARGV[8]+1, …: at most this many are generated,
--          each as "<id>:<epoch>:<time>:0:<data>". Without data the whole batch is ONE queue entry
--          "*<first_id>:<count>:<epoch>:<time>" (protocol v2: the batch, not the message, is what
--          Redis stores and moves; fetch.lua may split it).
-- Returns: {status, first_id, count, time_us}
--   status 1: generated ids first_id .. first_id+count-1 at Redis time time_us
--   status 2: the queue is full (backpressure), nothing generated
--   status 3: max messages reached, nothing generated
--   status 4: the id space is used up (next_id = id_limit), nothing generated
--   status 5: the data begins at another id than next_id (first_id is next_id): ask the source
--             again for next_id on; nothing generated
--   status -1: fenced: the lease is not ours (expired, or another epoch holds it); nothing generated
-- Errors (nothing mutated): bad arguments; DAMAGED for a next_id or max that is not a
-- non-negative integer (never reset: restarting at 0 would repeat ids); FORGOTTEN (see below).
-- A lease, queue or epoch log of the wrong type is set aside before the first write.
local batch_max = tonumber(ARGV[3])
local queue_max = tonumber(ARGV[4])
local epoch = tonumber(ARGV[2])
local min_next = tonumber(ARGV[6])
local id_limit = tonumber(ARGV[7])
if not string.match(ARGV[2], '^%d+$') then
  return redis.error_reply('ERR generate: epoch must be a decimal integer')
end
if not batch_max or batch_max < 1 or not queue_max or queue_max < 1 or not epoch
  or not min_next or min_next < 0 or not id_limit or id_limit < 1 then
  return redis.error_reply('ERR generate: bad arguments')
end
if ARGV[8] and ARGV[8] ~= '' and (not string.match(ARGV[8], '^%d+$') or #ARGV < 9) then
  return redis.error_reply('ERR generate: data must follow the id it begins at')
end
local gone = forgotten(KEYS[8], ARGV[5], KEYS[10])
if gone then return gone end
local bad = damaged('generate', KEYS[2]) or damaged('generate', KEYS[3])
if bad then return bad end
local now, now_us = redis_now()
guard('generate', now, KEYS[9], KEYS[6], {{KEYS[1], 'string'}, {KEYS[4], 'list'}, {KEYS[5], 'list'}})
local stop, next_id, n = claim_ids(KEYS[1], ARGV[1], KEYS[2], KEYS[3], min_next, id_limit, batch_max, now_us)
if stop then return stop end
local with_data = ARGV[8] ~= nil and ARGV[8] ~= ''
if with_data then
  if tonumber(ARGV[8]) ~= next_id then
    return {5, next_id, 0, now_us}
  end
  n = math.min(n, #ARGV - 8)
end
local room = queue_max - queued_messages(KEYS[4], next_id)
if room <= 0 then
  return {2, next_id, 0, now_us}
end
if room < n then
  n = room
  -- Cut short by a full queue: the batch ends on a multiple of 8 when it can, so the next starts
  -- on one and commit.lua combines its bitmaps with the outcome bitmaps without shifting them.
  if not with_data and n > (next_id + n) % 8 then
    n = n - (next_id + n) % 8
  end
end
if with_data then
  -- Append in chunks: unpack() of a huge table would overflow Lua's C stack.
  local suffix = ':' .. ARGV[2] .. ':' .. now .. ':0:'
  local chunk = {}
  for i = 0, n - 1 do
    chunk[#chunk + 1] = (next_id + i) .. suffix .. ARGV[9 + i]
    if #chunk == 1000 then
      redis.call('RPUSH', KEYS[4], unpack(chunk))
      chunk = {}
    end
  end
  if #chunk > 0 then
    redis.call('RPUSH', KEYS[4], unpack(chunk))
  end
else
  redis.call('RPUSH', KEYS[4], '*' .. next_id .. ':' .. n .. ':' .. ARGV[2] .. ':' .. now)
end
redis.call('SET', KEYS[2], next_id + n)
redis.call('HINCRBY', KEYS[6], 'generated', n)
redis.call('PUBLISH', KEYS[7], n)
extend_epoch_log(KEYS[5], ARGV[2], next_id, n, now)
return {1, next_id, n, now_us}
