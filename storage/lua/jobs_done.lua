-- A job answered. KEYS: the conversation's jobs. ARGV: job id. Returns 1 when it was listed.
return finish_job(KEYS[1], redis.call('GET', KEYS[1]), ARGV[1])
