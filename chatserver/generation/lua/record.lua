-- Record text up to `seq` (a watched tick's delta, or an unwatched reply's checkpoint).
-- KEYS: reply hash, reply text
-- ARGV: gid, owner, seq, text, ttl ms (0: keep), watched (1: mark the reply watched)
-- Returns 0 when the reply is no longer ours (claimed after our instance was thought dead).
if not owns(ARGV[1], ARGV[2]) then return 0 end
local created = false
-- Text sent again (a pipeline retried after a dropped connection) is not appended twice.
if tonumber(redis.call('HGET', KEYS[1], 'seq')) < tonumber(ARGV[3]) then
  created = redis.call('APPEND', KEYS[2], ARGV[4]) == #ARGV[4]
  if ARGV[6] == '1' then
    redis.call('HSET', KEYS[1], 'seq', ARGV[3], 'watched', 1)
  else
    redis.call('HSET', KEYS[1], 'seq', ARGV[3])
  end
elseif ARGV[6] == '1' then
  redis.call('HSET', KEYS[1], 'watched', 1)
end
if ARGV[5] ~= '0' then
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
elseif created then
  -- begin makes no text key: the first record gives it the hash's time to live.
  local left = redis.call('PTTL', KEYS[1])
  if left > 0 then redis.call('PEXPIRE', KEYS[2], left) end
end
return 1
