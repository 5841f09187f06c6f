-- reclaim.lua: give the in-flight messages of dead handlers back to the queue.
-- KEYS[1]: handler registry ({ns}:handlers), set of handler ids
-- KEYS[2]: queue ({ns}:queue), list
-- KEYS[3]: stats hash ({ns}:stats)
-- ARGV[1]: key prefix "{ns}:" — per-handler keys are derived here as
--          <prefix>hb:<handler> and <prefix>inflight:<handler>. They are not declared in KEYS
--          because the set of handlers is only known inside the script; all share the {ns} hash
--          tag, so they live in the same cluster slot as KEYS[1].
-- Returns: {handlers_reclaimed, messages_reclaimed}
-- A handler is dead when its heartbeat key has expired (SIGKILL runs no cleanup; the TTL is the
-- detector). Its messages go to the head of the queue so they are handled next. Atomic: a message
-- is in exactly one of the dead handler's set and the queue at every instant, and a late commit
-- by the (paused, not dead) handler is refused by commit.lua because SREM finds nothing.
local prefix = ARGV[1]
if not prefix or prefix == '' then
  return redis.error_reply('ERR reclaim: missing key prefix')
end
local dead, moved = 0, 0
for _, h in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', prefix .. 'hb:' .. h) == 0 then
    local set = prefix .. 'inflight:' .. h
    local msgs = redis.call('SMEMBERS', set)
    for i = 1, #msgs, 1000 do
      redis.call('LPUSH', KEYS[2], unpack(msgs, i, math.min(i + 999, #msgs)))
    end
    redis.call('DEL', set)
    redis.call('SREM', KEYS[1], h)
    dead = dead + 1
    moved = moved + #msgs
  end
end
if moved > 0 then
  redis.call('HINCRBY', KEYS[3], 'reclaimed', moved)
end
return {dead, moved}
