-- Append one message to a conversation's window (and, on a single Redis, to the outbox).
-- KEYS: seq, epoch, win, idem[, outbox]. ARGV: payload, size, idem ttl ms (0: no record),
-- key ttl s, outbox max, record state ("d": in the outbox, "p": not yet); on a single Redis
-- also KEYS jobs stream, conversation's jobs and ARGV the job's holder ('': no job).
-- Returns {0, offset, ms[, job id]} | {1, record} duplicate | {2} missing | {3} full
-- | {4, code, value} refused by the gate (with a gate: its keys and args follow the job's).
local idem_ttl = tonumber(ARGV[3])
if idem_ttl > 0 then
  local seen = redis.call('GET', KEYS[4])
  if seen then return {1, seen} end
end
if redis.call('EXISTS', KEYS[2]) == 0 then return {2} end
if redis.call('EXISTS', KEYS[1]) == 0 then
  -- The counter vanished under a live window: never restart at 1, rebuild instead.
  redis.call('DEL', KEYS[2], KEYS[3])
  return {2}
end
local outbox = KEYS[5]
if outbox and redis.call('XLEN', outbox) >= tonumber(ARGV[5]) then return {3} end
--GATE--
local offset = string.format('%d', redis.call('INCR', KEYS[1]))
local ms = string.format('%d', now_ms())
redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[2], offset .. '-0', 'm', ARGV[1], 't', ms)
if outbox then
  redis.call('XADD', outbox, '*', 'm', ARGV[1], 'o', offset, 't', ms)
end
if idem_ttl > 0 then
  redis.call('SET', KEYS[4], ARGV[6] .. offset .. ':' .. ms .. ':' .. ARGV[1], 'PX', idem_ttl)
end
local ttl = tonumber(ARGV[4])
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[3], ttl)
redis.call('EXPIRE', KEYS[1], 2 * ttl)
local job = ARGV[7]
if job and job ~= '' then  -- a question: its reply job, in this same step
  job = add_job(KEYS[6], KEYS[7], job, ARGV[1], offset, ms, ttl)
  return {0, tonumber(offset), tonumber(ms), job}
end
return {0, tonumber(offset), tonumber(ms)}
