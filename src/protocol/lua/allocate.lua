-- allocate.lua: step A of generation in a sharded namespace (docs/PROTOCOL.md, "Sharding"):
-- fenced, gap-free ids handed out in the control slot, to be appended to one shard by append.lua.
-- KEYS[1]: lease key ({ns}:lease)
-- KEYS[2]: next id ({ns}:next_id), integer, absent = 0
-- KEYS[3]: max messages ({ns}:max), integer, absent = unlimited
-- KEYS[4]: epoch log ({ns}:epochs), list of "<epoch>:<first_id>:<count>:<time_us>"
-- KEYS[5]: pending range ({ns}:pending), "<epoch>:<first_id>:<count>:<shard>:<time_us>"
-- KEYS[6]: incarnation ({ns}:incarnation)
-- KEYS[7]: error store ({ns}:errors), for entries naming keys of the wrong type set aside
-- KEYS[8]: stats hash ({ns}:stats), for the `bad` count of a key set aside
-- KEYS[9]: write counts ({ns}:writes), hash copy -> guarded calls (prelude.lua, forgotten)
-- ARGV[1]: our lease value "<epoch>:<instance>"
-- ARGV[2]: our epoch (integer)
-- ARGV[3]: count wanted, integer >= 1 (the caller bounds it by the shard's room under queue_max)
-- ARGV[4]: the guard "<token>/<copy>/<acked>" (prelude.lua, forgotten)
-- ARGV[5]: min_next_id, integer >= 0: the highest next id this copy has seen; a lower next_id is
--          FORGOTTEN (Redis went back in time), nothing written
-- ARGV[6]: id_limit, integer >= 1: ids are 0 .. id_limit-1
-- ARGV[7]: the shard the range is for, integer >= 0
-- ARGV[8]: "1" when the count was cut short by the shard's room: the range then ends on a
--          multiple of 8 when it can (up to 7 fewer), so batches stay aligned with the outcome
--          bitmaps' bytes, as generate.lua keeps them; "0" otherwise
-- ARGV[9]: the pending range the caller saw appended last, exactly as KEYS[5] held it ("" for
--          none; anything that cannot be a range, e.g. "?", to only ask what is pending)
-- Returns: {status, first_id, count, time_us, pending}
--   status 1: ids first_id .. first_id+count-1 allocated at Redis time time_us, and recorded as
--             pending (the new value of KEYS[5] is the fifth element): the caller appends them to
--             the shard (append.lua) before it allocates again
--   status 6: KEYS[5] is not ARGV[9]: a range may be allocated and not appended (the caller's
--             own, whose reply it lost, or a predecessor's), so nothing is allocated; the fifth
--             element is KEYS[5] ("" when absent), for the caller to append first. Allocation is
--             thus idempotent: a call that ran, repeated, allocates nothing more
--   status 3: max messages reached, nothing allocated (only once nothing is pending unseen)
--   status 4: the id space is used up, nothing allocated (likewise)
--   status -1: fenced: the lease is not ours; nothing allocated
-- Errors (nothing mutated): bad arguments; DAMAGED for a next_id or max that is not a
-- non-negative integer; FORGOTTEN (see above and prelude.lua).
-- The write count of a guarded call comes back beside this reply (scripts.rs, `guarded`).
local wanted = tonumber(ARGV[3])
local min_next = tonumber(ARGV[5])
local id_limit = tonumber(ARGV[6])
if not string.match(ARGV[2] or '', '^%d+$') or not string.match(ARGV[7] or '', '^%d+$') then
  return redis.error_reply('ERR allocate: epoch and shard must be decimal integers')
end
if not wanted or wanted < 1 or not min_next or min_next < 0 or not id_limit or id_limit < 1
  or not ARGV[9] then
  return redis.error_reply('ERR allocate: bad arguments')
end
local gone = forgotten(KEYS[6], ARGV[4], KEYS[9])
if gone then return gone end
local bad = damaged('allocate', KEYS[2]) or damaged('allocate', KEYS[3])
if bad then return bad end
local now, now_us = redis_now()
guard('allocate', now, KEYS[7], KEYS[8], {{KEYS[1], 'string'}, {KEYS[4], 'list'}, {KEYS[5], 'string'}})
-- Fencing first, then the pending range, then the counters: a range allocated and not seen
-- appended by the caller blocks allocation (and so the max and id-space stops) until the caller
-- appended it: at most one range is ever allocated and not appended, and the caller knows it.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {-1, 0, 0, now_us, ''}
end
local pending = redis.call('GET', KEYS[5]) or ''
if pending ~= ARGV[9] then
  return {6, 0, 0, now_us, pending}
end
local stop, next_id, n = claim_ids(KEYS[1], ARGV[1], KEYS[2], KEYS[3], min_next, id_limit, wanted, now_us)
if stop then
  if not stop.err then stop[5] = '' end
  return stop
end
if ARGV[8] == '1' and n == wanted and n > (next_id + n) % 8 then
  n = n - (next_id + n) % 8
end
pending = ARGV[2] .. ':' .. next_id .. ':' .. n .. ':' .. ARGV[7] .. ':' .. now
redis.call('SET', KEYS[2], next_id + n)
redis.call('SET', KEYS[5], pending)
extend_epoch_log(KEYS[4], ARGV[2], next_id, n, now)
return {1, next_id, n, now_us, pending}
