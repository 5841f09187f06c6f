-- renew.lua: extend the lease only if it is still ours (compare-and-pexpire).
-- KEYS[1]: lease key ({ns}:lease)
-- KEYS[2]: incarnation ({ns}:incarnation)
-- KEYS[3]: error store ({ns}:errors), for the entry naming a lease of the wrong type set aside
-- KEYS[4]: stats hash ({ns}:stats)
-- KEYS[5]: write counts ({ns}:writes), hash copy -> guarded calls (prelude.lua, forgotten)
-- ARGV[1]: our lease value "<epoch>:<instance>"
-- ARGV[2]: lease_ms, integer > 0
-- ARGV[3]: the guard "<token>/<copy>/<acked>": the incarnation token this copy joined, its copy id and its count of guarded calls seen to succeed (FORGOTTEN error, nothing written, otherwise)
-- Returns: 1 when renewed; 0 when the lease is gone or held by someone else (we must step down).
local ms = tonumber(ARGV[2])
if not ms or ms <= 0 then
  return redis.error_reply('ERR lease_ms must be a positive integer')
end
local gone = forgotten(KEYS[2], ARGV[3], KEYS[5])
if gone then return gone end
guard('renew', redis_now(), KEYS[3], KEYS[4], {{KEYS[1], 'string'}})
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ms)
  return 1
end
return 0
