-- prelude.lua: helpers every script starts with (scripts.rs puts this file in front of each one).
-- Defines only local functions (and one local the guarded scripts return); it reads no KEYS or
-- ARGV and writes nothing.

-- Set by `forgotten` once it has counted the call: Redis's count of the calling copy's guarded
-- calls, this one included. A guarded script returns it beside its reply (scripts.rs, `guarded`),
-- so the copy's own count catches up with Redis's after any call whose reply it lost.
local guard_writes

-- The Redis time as a decimal string of µs, and as a number. The string is what gets stored:
-- Lua 5.1 would print a 16-digit number in exponent form.
local function redis_now()
  local t = redis.call('TIME')
  local s = t[1] .. string.format('%06d', tonumber(t[2]))
  return s, tonumber(s)
end

-- nil when the namespace's incarnation key (KEYS entry `key`) still holds the token the caller
-- joined and Redis has not gone back on this copy's writes; otherwise the FORGOTTEN error reply
-- the script must return before writing anything: Redis lost data (wiped, flushed, restarted
-- empty, restored from an older copy, failed over to a lagging replica) or a copy halted the
-- namespace after it saw that happen (docs/PROTOCOL.md, invariant 9).
-- `guard` is "<token>/<copy>/<acked>": the token, a random id of the calling copy, and how many of
-- its guarded calls it has seen succeed. `writes` (KEYS entry, {ns}:writes) is a hash of copy id
-- -> guarded calls that passed this check; a passing call adds one, so Redis's count is never
-- below what the copy saw succeed unless Redis went back in time.
local function forgotten(key, guard, writes)
  local token, copy, acked = string.match(guard or '', '^([^/]*)/([%w.-]+)/(%d+)$')
  if not token then
    return redis.error_reply('ERR the guard argument must be "<token>/<copy>/<acked>", not "' .. tostring(guard) .. '"')
  end
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'none' and kind ~= 'string' then
    return redis.error_reply('FORGOTTEN ' .. key .. ' has type ' .. kind .. ' (damaged)')
  end
  local v = redis.call('GET', key)
  if v ~= token then
    if v and string.sub(v, 1, 7) == 'halted:' then
      return redis.error_reply('FORGOTTEN the namespace was halted by a copy that ' .. string.sub(v, 8))
    end
    if v then
      return redis.error_reply('FORGOTTEN ' .. key .. ' holds "' .. v .. '", not this copy\'s "' .. token .. '"')
    end
    return redis.error_reply('FORGOTTEN ' .. key .. ' is gone (this copy joined "' .. token .. '")')
  end
  kind = redis.call('TYPE', writes)['ok']
  if kind ~= 'none' and kind ~= 'hash' then
    return redis.error_reply('FORGOTTEN ' .. writes .. ' has type ' .. kind .. ' (damaged)')
  end
  local made = redis.call('HGET', writes, copy) or '0'
  if not string.match(made, '^%d+$') then
    return redis.error_reply('FORGOTTEN ' .. writes .. ' holds "' .. string.sub(made, 1, 40) .. '" for copy ' .. copy .. ' (damaged)')
  end
  if tonumber(made) < tonumber(acked) then
    return redis.error_reply('FORGOTTEN ' .. writes .. ' went back from ' .. acked .. ' to ' .. made
      .. ' for copy ' .. copy .. ' (its guarded calls seen to succeed)')
  end
  guard_writes = tonumber(made) + 1
  redis.call('HSET', writes, copy, string.format('%d', guard_writes))
  return nil
end

-- `command key v1 v2 …` over every value of the list `values`, 1000 at a time: unpack() of a
-- huge table would overflow Lua's C stack. 1000 is even, so field/value pairs (HSET) stay whole.
local function in_chunks(command, key, values)
  for i = 1, #values, 1000 do
    redis.call(command, key, unpack(values, i, math.min(i + 999, #values)))
  end
end

-- Moves `key` (found with type `kind`) aside to <key>:quarantine:<time_us> and records why in the
-- error store (an entry naming both keys, printed by getErrors) and the `bad` counter: the data is
-- kept for a person to look at, and the group goes on with a fresh key.
local function set_aside(script, key, kind, now, errors, stats)
  local aside = key .. ':quarantine:' .. now
  redis.call('RENAME', key, aside)
  redis.call('RPUSH', errors, aside .. '\t' .. script .. ': ' .. key .. ' had type ' .. kind
    .. ', moved to ' .. aside .. '\t' .. now)
  redis.call('HINCRBY', stats, 'bad', 1)
end

-- Before a script's first write: each key of `keys` (a list of {key, type}) that exists with
-- another type is set aside. Redis does not undo a script's earlier writes when a later command
-- fails, so a write that could fail on a wrong type must never come after one that cannot; this
-- makes every later write safe. The error store and the counters come first, because setting a
-- key aside writes to both.
local function guard(script, now, errors, stats, keys)
  for _, pair in ipairs({{errors, 'list'}, {stats, 'hash'}}) do
    local kind = redis.call('TYPE', pair[1])['ok']
    if kind ~= 'none' and kind ~= pair[2] then
      set_aside(script, pair[1], kind, now, errors, stats)
    end
  end
  for _, pair in ipairs(keys) do
    local kind = redis.call('TYPE', pair[1])['ok']
    if kind ~= 'none' and kind ~= pair[2] then
      set_aside(script, pair[1], kind, now, errors, stats)
    end
  end
end

-- nil when `key`, a counter that must never be reset (next id, epoch, max), is absent or holds a
-- non-negative integer; otherwise the DAMAGED error reply the script must return, writing
-- nothing: setting it aside would restart ids or epochs at 0, so the app halts the group instead
-- and `app repair` recomputes it (docs/PROTOCOL.md, invariant 8).
local function damaged(script, key)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'none' then
    return nil
  end
  if kind ~= 'string' then
    return redis.error_reply('DAMAGED ' .. script .. ': ' .. key .. ' has type ' .. kind)
  end
  local v = redis.call('GET', key)
  if not string.match(v, '^%d+$') then
    return redis.error_reply('DAMAGED ' .. script .. ': ' .. key .. ' holds "'
      .. string.sub(v, 1, 40) .. '", not a non-negative integer')
  end
  return nil
end


-- The first id, count, epoch and generation time of a queue entry that is a batch
-- ("*<first_id>:<count>:<epoch>:<generated_us>", count >= 1), as numbers (the time as its
-- string too); nil for anything else (a single payload, or garbage).
local function batch_entry(e)
  local first, n, epoch, gen = string.match(e, '^%*(%d+):(%d+):(%d+):(%d+)$')
  if not first or tonumber(n) < 1 or tonumber(first) + tonumber(n) > 4294967296 then
    return nil
  end
  return tonumber(first), tonumber(n), epoch, gen
end

-- Records in the epoch log `key` that epoch `epoch` (its decimal string) generated ids
-- next_id .. next_id+n-1 at Redis time `now`: the last range is extended when it is the same
-- epoch's and contiguous, so the log grows per failover, not per batch, and a range's time is
-- when its epoch's first message was made.
local function extend_epoch_log(key, epoch, next_id, n, now)
  local last = redis.call('LINDEX', key, -1)
  if last then
    local e, first, count, t0 = string.match(last, '^(%d+):(%d+):(%d+):(%d+)$')
    if e and tonumber(e) == tonumber(epoch) and tonumber(first) + tonumber(count) == next_id then
      redis.call('LSET', key, -1, e .. ':' .. first .. ':' .. (tonumber(count) + n) .. ':' .. t0)
      return
    end
  end
  redis.call('RPUSH', key, epoch .. ':' .. next_id .. ':' .. n .. ':' .. now)
end

-- The checks of a generation step (generate.lua, allocate.lua) before it hands out ids, after its
-- guard: the lease `lease_key` still holds the caller's `lease_value` (fencing, invariant 1), the
-- counter `next_key` has not gone below `min_next` (FORGOTTEN), and ids are left under `id_limit`
-- and under max messages (`max_key`, absent = unlimited).
-- Returns the reply the script must return at once ({-1, 0, 0, now_us} fenced; {4, next_id, 0,
-- now_us} id space used up; {3, next_id, 0, now_us} max reached; the FORGOTTEN error), or nil,
-- next_id and how many ids (1 .. `wanted`) may be handed out from it.
local function claim_ids(lease_key, lease_value, next_key, max_key, min_next, id_limit, wanted, now_us)
  if redis.call('GET', lease_key) ~= lease_value then
    return {-1, 0, 0, now_us}
  end
  local next_id = tonumber(redis.call('GET', next_key) or '0')
  if next_id < min_next then
    return redis.error_reply('FORGOTTEN ' .. next_key .. ' went back from ' .. min_next .. ' to ' .. next_id)
  end
  if next_id >= id_limit then
    return {4, next_id, 0, now_us}
  end
  local n = math.min(wanted, id_limit - next_id)
  local raw_max = redis.call('GET', max_key)
  if raw_max then
    local max = tonumber(raw_max)
    if next_id >= max then
      return {3, next_id, 0, now_us}
    end
    n = math.min(n, max - next_id)
  end
  return nil, next_id, n
end

-- How many messages the queue `key` holds. Fresh ids are queued in order and taken from the head
-- (a batch entry may be split, its head part taken), so that is next_id minus the head entry's
-- first id; the entry count when the head is not a message (garbage someone pushed).
local function queued_messages(key, next_id)
  local head = redis.call('LINDEX', key, 0)
  if not head then
    return 0
  end
  local first = batch_entry(head)
  if not first then
    first = tonumber(string.match(head, '^(%d+):'))
  end
  if first and first <= next_id then
    return next_id - first
  end
  return redis.call('LLEN', key)
end
