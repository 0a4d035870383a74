-- This instance holds no joined connection of ARGV[2] any more. Returns 0 when the user is
-- still online (elsewhere), or was not (the entry had expired), else changed().
--COMMON--
local me = ARGV[1] .. '\0' .. ARGV[2]
local now = now_ms()
local score = redis.call('ZSCORE', KEYS[1], me)
if not score then
  return 0
end
redis.call('ZREM', KEYS[1], me)
if tonumber(score) < now or has_live(ARGV[2], nil, now) then
  return 0
end
return changed(ARGV[1])
