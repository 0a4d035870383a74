-- This instance holds a joined connection of ARGV[2]: its entry, alive for ARGV[3] ms (the
-- key for ARGV[4] ms). Returns 0 when the user was online already, else changed().
--COMMON--
local me = ARGV[1] .. '\0' .. ARGV[2]
local now = now_ms()
local was = has_live(ARGV[2], nil, now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), me)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if was then
  return 0
end
return changed(ARGV[1])
