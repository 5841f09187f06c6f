-- renew.lua: extend the lease only if it is still ours (compare-and-pexpire).
-- KEYS[1]: lease key ({ns}:lease)
-- ARGV[1]: our lease value "<epoch>:<instance>"
-- ARGV[2]: lease_ms, integer > 0
-- Returns: 1 when renewed; 0 when the lease is gone or held by someone else (we must step down).
local ms = tonumber(ARGV[2])
if not ms or ms <= 0 then
  return redis.error_reply('ERR lease_ms must be a positive integer')
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ms)
  return 1
end
return 0
