-- prelude.lua: helpers every script starts with (scripts.rs puts this file in front of each one).
-- Defines only local functions; it reads no KEYS or ARGV and writes nothing.

-- The Redis time as a decimal string of µs, and as a number. The string is what gets stored:
-- Lua 5.1 would print a 16-digit number in exponent form.
local function redis_now()
  local t = redis.call('TIME')
  local s = t[1] .. string.format('%06d', tonumber(t[2]))
  return s, tonumber(s)
end

-- nil when the namespace's incarnation key (KEYS entry `key`) still holds `token`, the one the
-- caller joined; otherwise the FORGOTTEN error reply the script must return before writing
-- anything: Redis lost data (wiped, flushed, restarted empty, restored from an older copy) or a
-- copy halted the namespace after it saw that happen (docs/PROTOCOL.md, invariant 9).
local function forgotten(key, token)
  local v = redis.call('GET', key)
  if v == token then
    return nil
  end
  if v and string.sub(v, 1, 7) == 'halted:' then
    return redis.error_reply('FORGOTTEN the namespace was halted by a copy that ' .. string.sub(v, 8))
  end
  if v then
    return redis.error_reply('FORGOTTEN ' .. key .. ' holds "' .. v .. '", not this copy\'s "' .. tostring(token) .. '"')
  end
  return redis.error_reply('FORGOTTEN ' .. key .. ' is gone (this copy joined "' .. tostring(token) .. '")')
end

