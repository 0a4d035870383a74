-- A job answered. KEYS: the conversation's jobs (order, data, count). ARGV: job id.
-- Returns 1 when it was there.
return finish_job(KEYS, ARGV[1])
