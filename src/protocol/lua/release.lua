#!lua flags=allow-oom
-- release.lua: delete a lock only if it still holds our value (compare-and-delete).
-- Used for the leader lease on a clean stop and for the getErrors drain lock.
-- Runs under Redis's out-of-memory refusal (allow-oom): it frees memory or holds a small lock,
-- and getErrors is the tool that frees memory.
-- KEYS[1]: the lock key
-- ARGV[1]: our value
-- Returns: 1 when deleted; 0 when it was not ours (nothing changed), also when the key has
-- another type than a string (then it cannot hold our value; whoever uses it sets it aside).
if redis.call('TYPE', KEYS[1])['ok'] == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
