-- One token from a user's bucket of one kind (REST requests, conversation creations).
-- KEYS: the bucket hash. ARGV: capacity (per minute, refilled continuously).
-- Returns 0 to go ahead, else the ms until a token is back.
local now = now_ms()
local capacity = tonumber(ARGV[1])
local rate = capacity / 60000
local tokens = tonumber(redis.call('HGET', KEYS[1], 't') or capacity)
local at = tonumber(redis.call('HGET', KEYS[1], 'at') or now)
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) / rate) end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], 120000)
return wait
