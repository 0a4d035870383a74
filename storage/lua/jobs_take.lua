-- A dead holder's job taken over. KEYS: the conversation's jobs (order, data). ARGV: job id,
-- the dead holder, the new one. Returns {offset, ms, payload}, or false when the job is done
-- or was taken by another instance first.
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then return false end
local job = cmsgpack.unpack(raw)
if job[1] ~= ARGV[2] then return false end
job[1] = ARGV[3]
redis.call('HSET', KEYS[2], ARGV[1], cmsgpack.pack(job))
local offset = redis.call('ZSCORE', KEYS[1], ARGV[1])
return {tonumber(offset), job[2], job[3]}
