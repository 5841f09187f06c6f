-- set_aside.lua: set aside every given key that exists with another type than expected, the way
-- the other scripts do before their first write; for the keys only plain commands touch (a
-- handler's in-flight set, read by its reconciliation).
-- KEYS[1]: error store ({ns}:errors), for the entries naming the keys set aside
-- KEYS[2]: stats hash ({ns}:stats)
-- KEYS[3..]: keys to check
-- ARGV[1]: the caller, named in the entries ("reconcile")
-- ARGV[2..]: the expected type of KEYS[3..], in order ("list", "set", "hash", "string")
-- Returns: the number of keys checked.
if #ARGV ~= #KEYS - 1 or not ARGV[1] or ARGV[1] == '' then
  return redis.error_reply('ERR set_aside: one expected type per key, after the caller')
end
local wanted = {}
for i = 3, #KEYS do
  wanted[#wanted + 1] = {KEYS[i], ARGV[i - 1]}
end
guard(ARGV[1], redis_now(), KEYS[1], KEYS[2], wanted)
return #wanted
