-- settle_shards.lua: the namespace's shard count (docs/PROTOCOL.md, "Sharding"), stored once, by
-- the first copy to join, in one step: two copies joining at the same moment with different
-- `--shards` can no longer both see "nothing stored" and each go its own way.
-- KEYS[1]: the shard count ({ns}:shards), integer 1-64, absent until the first copy joins
-- KEYS[2]: the counter ({ns}:next_id): present once the namespace has generated
-- ARGV[1]: the count this copy was started with (integer 1-64)
-- Returns: the stored count, as stored (the caller checks it and compares it with its own):
--   the one already stored; else 1 if the namespace has generated (it was used before counts
--   were stored, so unsharded: its queue and records are where only unsharded copies look);
--   else ARGV[1]. The returned count is stored if none was.
-- Errors (nothing mutated): ARGV[1] not an integer 1-64 (64 is SHARDS_MAX in src/protocol/shards.rs,
-- which refuses a bad count before calling; this is the script's own argument check).
local wanted = tonumber(ARGV[1])
if not string.match(ARGV[1] or '', '^%d+$') or wanted < 1 or wanted > 64 then
  return redis.error_reply('ERR settle_shards: ARGV[1] must be an integer 1-64')
end
local have = redis.call('GET', KEYS[1])
if have then
  return have
end
local count = ARGV[1]
if redis.call('EXISTS', KEYS[2]) == 1 then
  count = '1'
end
redis.call('SET', KEYS[1], count)
return count
