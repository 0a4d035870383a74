-- Keep a connection counted. KEYS: conns. ARGV: connection id, ttl ms.
local now = now_ms()
if redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 1
