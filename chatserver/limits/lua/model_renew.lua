-- Keep the places of a model's requests still in flight. KEYS: in flight. ARGV: lease ms,
-- then the tokens (a place already released or expired is not brought back).
local expires = now_ms() + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', expires, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
