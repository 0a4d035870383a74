-- A job answered. KEYS: jobs stream[, the conversation's jobs]. ARGV: job id.
return finish_job(KEYS[1], KEYS[2], ARGV[1])
