-- A reply job outside the window's append (tests, tools, an older release's job claimed).
-- KEYS: the conversation's jobs (order, data, count). ARGV: job id, offset, holder, ms,
-- payload, ttl s. Returns 1 when it is alone (add_job).
return add_job(KEYS, ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
