-- A permit for one request to a model (limits/model_guard.py): a place among its requests in
-- flight, and a start within the last minute. KEYS: in flight (a sorted set of permit tokens
-- scored by when their place expires), started (tokens scored by their start, one minute
-- kept). ARGV: token, most in flight (0: no cap), most a minute (0: no cap), lease ms.
-- {0, 0}: granted; {1, 0}: too many in flight; {2, ms}: the minute is full for ms more.
local now = now_ms()
local concurrent, per_minute = tonumber(ARGV[2]), tonumber(ARGV[3])
if concurrent > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)  -- places of holders that died
  if redis.call('ZCARD', KEYS[1]) >= concurrent then return {1, 0} end
end
if per_minute > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60000)
  if redis.call('ZCARD', KEYS[2]) >= per_minute then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {2, math.max(1, tonumber(oldest[2]) + 60000 - now + 1)}
  end
  redis.call('ZADD', KEYS[2], now, ARGV[1])
  redis.call('PEXPIRE', KEYS[2], 61000)
end
if concurrent > 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
end
return {0, 0}
