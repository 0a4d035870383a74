-- A dead holder's job taken over. KEYS: the conversation's jobs. ARGV: job id, the dead
-- holder, the new one. Returns {offset, ms, payload}, or false when the job is done or was
-- taken by another instance first.
local raw = redis.call('GET', KEYS[1])
local jobs = jobs_in(raw)
for i = 1, #jobs, JOB_FIELDS do
  if jobs[i] == ARGV[1] then
    if jobs[i + 2] ~= ARGV[2] then return false end
    jobs[i + 2] = ARGV[3]
    jobs_put(KEYS[1], jobs)
    return {jobs[i + 1], jobs[i + 3], jobs[i + 4]}
  end
end
return false
