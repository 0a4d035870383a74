-- A reply job outside the window's append (a cluster's second step, recovery, tests).
-- KEYS: jobs stream[, the conversation's jobs]. ARGV: holder, payload, offset, ms, ttl s,
-- announced ('': not yet).
-- Returns the job's id.
local id = add_job(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6] ~= '')
return id
