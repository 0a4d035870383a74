-- A reply job outside the window's append (tests, tools). KEYS: the conversation's jobs.
-- ARGV: job id, offset, holder, ms, payload, ttl s. Returns 1 when it is alone (add_job).
return add_job(KEYS[1], redis.call('GET', KEYS[1]), ARGV[1], ARGV[2], ARGV[3], ARGV[4],
  ARGV[5], ARGV[6])
