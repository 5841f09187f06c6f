-- release.lua: delete a lock only if it still holds our value (compare-and-delete).
-- Used for the leader lease on a clean stop and for the getErrors drain lock.
-- KEYS[1]: the lock key
-- ARGV[1]: our value
-- Returns: 1 when deleted; 0 when it was not ours (nothing changed).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
