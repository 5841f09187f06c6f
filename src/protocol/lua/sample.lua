-- sample.lua: push one counters sample onto the bounded history, from the lease holder only.
-- KEYS[1]: lease key ({ns}:lease)
-- KEYS[2]: stats hash ({ns}:stats)
-- KEYS[3]: history ({ns}:stats:history), list of JSON samples, newest first
-- KEYS[4]: error store ({ns}:errors), for entries naming keys of the wrong type set aside
-- ARGV[1]: our lease value "<epoch>:<instance>"
-- ARGV[2]: samples to keep, integer 1..1000
-- ARGV[3]: optional, for a namespace spread over shards (whose counters live in the shards'
--          slots): the counters summed by the caller, "<generated>,<processed>,<errors>,
--          <duplicates>,<reclaimed>", used instead of KEYS[2]'s
-- Returns: 1 when a sample was pushed; 0 when the lease is not ours (nothing changed).
-- A sample: {"time_us":T,"generated":N,"processed":N,"errors":N,"duplicates":N,"reclaimed":N}.
-- One script so the push and the trim never separate (the list stays bounded even if the caller
-- dies), the counters and the time are read at one instant, and a deposed generator cannot add
-- samples next to its successor's.
local keep = tonumber(ARGV[2])
if not ARGV[1] or ARGV[1] == '' or not keep or keep < 1 or keep > 1000 or keep ~= math.floor(keep) then
  return redis.error_reply('ERR sample: bad arguments')
end
guard('sample', redis_now(), KEYS[4], KEYS[2], {{KEYS[1], 'string'}, {KEYS[3], 'list'}})
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local parts = {'{"time_us":' .. redis_now()}
local names = {'generated', 'processed', 'errors', 'duplicates', 'reclaimed'}
local values
if ARGV[3] and ARGV[3] ~= '' then
  values = {}
  for v in string.gmatch(ARGV[3], '[^,]+') do
    values[#values + 1] = v
  end
else
  values = redis.call('HMGET', KEYS[2], unpack(names))
end
for i, name in ipairs(names) do
  local v = values[i]
  -- Only digits go into the JSON: a corrupt counter reads as 0 here rather than breaking status.
  if not v or not string.match(v, '^%d+$') then
    v = '0'
  end
  parts[#parts + 1] = '"' .. name .. '":' .. v
end
redis.call('LPUSH', KEYS[3], table.concat(parts, ',') .. '}')
redis.call('LTRIM', KEYS[3], 0, keep - 1)
return 1
