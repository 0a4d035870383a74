-- Release the slot if generation ARGV[1] still holds it.
-- KEYS: reply hash, reply text
if redis.call('HGET', KEYS[1], 'gid') == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 0
