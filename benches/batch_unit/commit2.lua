-- commit2.lua (PROTOTYPE for issue 12, used only by benches/batch_unit.rs; not the protocol):
-- records outcomes for any subset of the indexes of any of this handler's batches, with a
-- read-modify-write of the batch's bytes in the outcome bitmaps instead of a SETBIT per message.
-- KEYS[1]: this handler's in-flight hash (see fetch2.lua)
-- KEYS[2]: outcome bitmap ({ns}:done), bit id set = an outcome was recorded for id
-- KEYS[3]: success bitmap ({ns}:ok)
-- KEYS[4]: error store, a list of "<id>\t<reason>"
-- KEYS[5]: stats hash (fields processed, errors, duplicates)
-- ARGV[1]: g, the number of groups; then per group: first, n, and one string of 2-byte
--   big-endian tokens index*2+ok (index within the batch, ok 1 = handled ok, 0 = handler
--   error): no argument object per message.
-- Ownership is per batch (the field exists in KEYS[1]); duplicate detection per id (its done
-- bit). Both bitmaps' bytes for the batch are read once, changed in Lua, written back once: the
-- edge bytes it shares with neighbour batches are written back unchanged, inside this one script.
-- Returns: {processed, errors, refused, duplicates}.
local pos = 2
local processed, failed, refused, dup = 0, 0, 0, 0
local errs = {}
for _ = 1, tonumber(ARGV[1]) do
  local field = ARGV[pos]
  local first, n, packed = tonumber(ARGV[pos]), tonumber(ARGV[pos + 1]), ARGV[pos + 2]
  local k = #packed / 2
  pos = pos + 3
  if redis.call('HEXISTS', KEYS[1], field) == 0 then
    refused = refused + k
  else
    local lo, hi = math.floor(first / 8), math.floor((first + n - 1) / 8)
    local done = { string.byte(redis.call('GETRANGE', KEYS[2], lo, hi), 1, -1) }
    local ok = { string.byte(redis.call('GETRANGE', KEYS[3], lo, hi), 1, -1) }
    for i = #done + 1, hi - lo + 1 do done[i] = 0 end
    for i = #ok + 1, hi - lo + 1 do ok[i] = 0 end
    local recorded, ok_changed = 0, false
    -- string.byte returns its values on Lua's C stack: at most 4000 at a time.
    for from = 1, #packed, 4000 do
      local tb = { string.byte(packed, from, math.min(from + 3999, #packed)) }
      for j = 1, #tb, 2 do
        local t = tb[j] * 256 + tb[j + 1]
        local id = first + bit.rshift(t, 1)
        local b = bit.rshift(id, 3) - lo + 1
        local mask = bit.lshift(1, 7 - bit.band(id, 7))
        if bit.band(done[b], mask) ~= 0 then
          dup = dup + 1
        else
          done[b] = bit.bor(done[b], mask)
          recorded = recorded + 1
          if bit.band(t, 1) == 1 then
            ok[b] = bit.bor(ok[b], mask)
            ok_changed = true
            processed = processed + 1
          else
            failed = failed + 1
            errs[#errs + 1] = id .. '\thandler error'
          end
        end
      end
    end
    if recorded > 0 then
      redis.call('SETRANGE', KEYS[2], lo, string.char(unpack(done)))
    end
    if ok_changed then
      redis.call('SETRANGE', KEYS[3], lo, string.char(unpack(ok)))
    end
    if redis.call('HINCRBY', KEYS[1], 'o' .. field, -recorded) <= 0 then
      redis.call('HDEL', KEYS[1], field, 'o' .. field)
    end
  end
end
if #errs > 0 then
  redis.call('RPUSH', KEYS[4], unpack(errs))
end
redis.call('HINCRBY', KEYS[5], 'processed', processed)
redis.call('HINCRBY', KEYS[5], 'errors', failed)
if dup > 0 then
  redis.call('HINCRBY', KEYS[5], 'duplicates', dup)
end
return { processed, failed, refused, dup }
