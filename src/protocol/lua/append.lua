-- append.lua: step B of generation in a sharded namespace (docs/PROTOCOL.md, "Sharding"): an id
-- range allocated by allocate.lua becomes one batch entry of a shard's queue, at most once, and
-- only for an epoch the shard has not seen superseded. With count 0 it only seals the shard.
-- KEYS[1]: the shard's queue ({ns/s}:queue)
-- KEYS[2]: the shard's alloc mark ({ns/s}:alloc_mark), integer, absent = 0: the end of the
--          highest range appended here
-- KEYS[3]: the shard's epoch seen ({ns/s}:epoch_seen), integer, absent = 0
-- KEYS[4]: the shard's stats hash ({ns/s}:stats)
-- KEYS[5]: the shard's wake-up channel ({ns/s}:wake)
-- KEYS[6]: the shard's incarnation ({ns/s}:incarnation)
-- KEYS[7]: the shard's error store ({ns/s}:errors), for entries naming keys set aside
-- KEYS[8]: the shard's write counts ({ns/s}:writes)
-- ARGV[1]: the epoch that allocated the range (integer); for a seal, the sealing epoch
-- ARGV[2]: first id of the range (integer >= 0)
-- ARGV[3]: count (integer >= 0); 0 = seal: only raise epoch_seen to ARGV[1]
-- ARGV[4]: the range's generation time, Redis µs (from allocate.lua's reply)
-- ARGV[5]: the guard "<token>/<copy>/<acked>" of this shard (prelude.lua, forgotten)
-- Returns: {status, alloc_mark, epoch_seen} (after the call)
--   status 1: appended "*<first>:<count>:<epoch>:<time>" (or sealed): alloc_mark = first+count,
--             epoch_seen = max(epoch_seen, epoch)
--   status 2: the range ends at or before alloc_mark: it was appended already (a retry, or the
--             successor completing it); nothing written
--   status -1: fenced: epoch_seen is above the epoch; nothing written
-- The mark is checked before the epoch: a range already appended is reported as such to anyone.
-- Errors (nothing mutated): bad arguments; DAMAGED for a mark that is not a non-negative integer;
-- FORGOTTEN (prelude.lua).
for i = 1, 4 do
  if not string.match(ARGV[i] or '', '^%d+$') then
    return redis.error_reply('ERR append: ARGV[' .. i .. '] must be a decimal integer')
  end
end
local epoch, first, count = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if first + count > 4294967296 then
  return redis.error_reply('ERR append: the range passes the id space')
end
local gone = forgotten(KEYS[6], ARGV[5], KEYS[8])
if gone then return gone end
local bad = damaged('append', KEYS[2]) or damaged('append', KEYS[3])
if bad then return bad end
local now = redis_now()
guard('append', now, KEYS[7], KEYS[4], {{KEYS[1], 'list'}})
local mark = tonumber(redis.call('GET', KEYS[2]) or '0')
local seen = tonumber(redis.call('GET', KEYS[3]) or '0')
if count > 0 and first < mark then
  return {2, mark, seen}
end
if epoch < seen then
  return {-1, mark, seen}
end
if epoch > seen then
  redis.call('SET', KEYS[3], ARGV[1])
  seen = epoch
end
if count == 0 then
  return {1, mark, seen}
end
redis.call('RPUSH', KEYS[1], '*' .. ARGV[2] .. ':' .. ARGV[3] .. ':' .. ARGV[1] .. ':' .. ARGV[4])
redis.call('SET', KEYS[2], first + count)
redis.call('HINCRBY', KEYS[4], 'generated', count)
redis.call('PUBLISH', KEYS[5], count)
return {1, first + count, seen}
