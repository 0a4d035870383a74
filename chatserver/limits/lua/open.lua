-- Count a connection: a sorted set of connection ids scored by when they stop counting.
-- KEYS: conns, today's tokens. ARGV: connection id, max connections, ttl ms.
-- 0: refused; 1: counted; 2: counted, and today's token counter (KEYS[2]) does not exist yet.
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
if redis.call('EXISTS', KEYS[2]) == 0 then return 2 end
return 1
