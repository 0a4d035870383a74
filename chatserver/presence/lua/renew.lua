-- Instance ARGV[1] still holds users ARGV[4..]: their entries live ARGV[2] ms more (the key
-- ARGV[3] ms). Expired entries (a dead instance's, or ours if we were late) go first.
-- Returns changed() when someone went offline or one of ours came back, else 0.
--COMMON--
local now = now_ms()
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
end
local expiry = now + tonumber(ARGV[2])
local pairs_ = {}
for i = 4, #ARGV do
  pairs_[#pairs_ + 1] = expiry
  pairs_[#pairs_ + 1] = ARGV[1] .. '\0' .. ARGV[i]
end
local added = 0
if #pairs_ > 0 then
  added = redis.call('ZADD', KEYS[1], unpack(pairs_))
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local change = added > 0
if not change then
  for _, entry in ipairs(expired) do
    if not has_live(user_of(entry), nil, now) then
      change = true
      break
    end
  end
end
if not change then
  return 0
end
return changed(ARGV[1])
