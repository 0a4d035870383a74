-- A job answered. KEYS: jobs stream[, the conversation's jobs]. ARGV: job id.
if KEYS[2] then redis.call('ZREM', KEYS[2], ARGV[1]) end
redis.call('XACK', KEYS[1], 'repliers', ARGV[1])
return redis.call('XDEL', KEYS[1], ARGV[1])
