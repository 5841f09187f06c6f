-- acquire.lua: take the leader lease if it is free, under a new fencing epoch; and, on every poll
-- of every candidate, check that Redis has not gone back in time.
-- KEYS[1]: lease key ({ns}:lease), string "<epoch>:<instance>" with a TTL
-- KEYS[2]: epoch counter ({ns}:epoch), integer
-- KEYS[3]: holder's connection id ({ns}:lease:conn), integer
-- KEYS[4]: incarnation ({ns}:incarnation)
-- KEYS[5]: next id ({ns}:next_id), integer, absent = 0
-- KEYS[6]: error store ({ns}:errors), for the entry naming a key set aside (wrong type)
-- KEYS[7]: stats hash ({ns}:stats)
-- KEYS[8]: write counts ({ns}:writes), hash copy -> guarded calls (prelude.lua, forgotten)
-- ARGV[1]: instance id (unique per process)
-- ARGV[2]: lease_ms, integer > 0
-- ARGV[3]: the caller's Redis connection id (CLIENT ID), recorded for fast death detection
-- ARGV[4]: the guard "<token>/<copy>/<acked>": the incarnation token this copy joined, its copy id and its count of guarded calls seen to succeed
-- ARGV[5]: min_epoch, integer >= 0: the highest epoch this copy has seen
-- ARGV[6]: min_next_id, integer >= 0: the highest next id this copy has seen
-- Returns: {epoch, value, epoch_now, next_id_now}: epoch > 0 and value = "<epoch>:<instance>" when
--          this call took the lease; epoch = 0 and value = the holder when the lease is held.
--          epoch_now and next_id_now are the counters after the call, so every candidate keeps
--          its high-water marks current (a poll every lease_ms/10).
-- Errors: FORGOTTEN (nothing written) when the incarnation token differs, or the epoch counter or
--          next id is below what this copy has seen: Redis lost data (docs/PROTOCOL.md, inv. 9).
--          DAMAGED (nothing written) when the epoch counter or next id is not an integer.
-- A lease or connection-id key of the wrong type is set aside first (a free lease is safe: the
-- next holder gets a new epoch).
-- Atomic because INCR and SET must not be separated: two candidates must never share an epoch,
-- and an epoch must never be spent without a lease carrying it.
local ms = tonumber(ARGV[2])
local min_epoch = tonumber(ARGV[5])
local min_next = tonumber(ARGV[6])
if not ms or ms <= 0 or ms ~= math.floor(ms) then
  return redis.error_reply('ERR lease_ms must be a positive integer')
end
if not string.match(ARGV[3] or '', '^%d+$') then
  return redis.error_reply('ERR client id must be a decimal integer')
end
if not min_epoch or min_epoch < 0 or not min_next or min_next < 0 then
  return redis.error_reply('ERR acquire: bad high-water marks')
end
local gone = forgotten(KEYS[4], ARGV[4], KEYS[8])
if gone then return gone end
local bad = damaged('acquire', KEYS[2]) or damaged('acquire', KEYS[5])
if bad then return bad end
local epoch_now = tonumber(redis.call('GET', KEYS[2]) or '0')
local next_now = tonumber(redis.call('GET', KEYS[5]) or '0')
if epoch_now < min_epoch then
  return redis.error_reply('FORGOTTEN ' .. KEYS[2] .. ' went back from ' .. min_epoch .. ' to ' .. epoch_now)
end
if next_now < min_next then
  return redis.error_reply('FORGOTTEN ' .. KEYS[5] .. ' went back from ' .. min_next .. ' to ' .. next_now)
end
guard('acquire', redis_now(), KEYS[6], KEYS[7], {{KEYS[1], 'string'}, {KEYS[3], 'string'}})
local holder = redis.call('GET', KEYS[1])
if holder then
  return {0, holder, epoch_now, next_now}
end
local epoch = redis.call('INCR', KEYS[2])
local value = epoch .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], value, 'PX', ms)
redis.call('SET', KEYS[3], ARGV[3])
return {epoch, value, epoch, next_now}
