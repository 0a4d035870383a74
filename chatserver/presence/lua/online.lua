-- The users with a live entry, each once.
--COMMON--
local now = now_ms()
local seen, out = {}, {}
for _, entry in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  local user = user_of(entry)
  if not seen[user] then
    seen[user] = true
    out[#out + 1] = user
  end
end
return out
