-- Append one message to a conversation's window (and, on a single Redis, to the outbox).
-- KEYS: seq, epoch, win, idem, the conversation's reply jobs (their count, order and data:
-- prelude.lua), outbox, the holder's job registry (the last two unused on a cluster: another
-- slot). ARGV: payload, size, idem ttl ms
-- (0: no record), key ttl s, outbox max (0: no bound), record state ("d": in the outbox,
-- appended here; "p": not yet, the caller's next step), ttl every (refresh the TTLs when the
-- offset is a multiple of it), the question's job id ('': no job), its holder, its member
-- of the holder's registry when listed there in this step ('': by the caller, before), the job
-- this message answers, finished in the same step ('': none), then the publish command (PUBLISH, SPUBLISH; '': none), the conversation's channel,
-- and the envelope that fans the message out (chatserver/fanout/envelope.py) packed up to its
-- last two fields, then how many keys and args the gate has (0 without one). The gate's keys
-- and args follow these, then the follow's (a step run after a question's append when its
-- job is alone in line: window_follow.lua).
-- Returns {0, offset, ms[, 1: the job is alone in its conversation, what the follow returned
-- (false: none ran, or it returned no table)[, 1: the follow's table stands for the job, none
-- was added]]} | {1, record} duplicate | {2} missing | {3} full | {4, code, value} refused by
-- the gate.
-- One MGET reads the idempotency record, both keys whose absence means a missing window,
-- the conversation's unfinished jobs, and the gate's and the follow's keys (their reads cost
-- nothing more; a key that holds no string reads as false).
local reads = {KEYS[4], KEYS[2], KEYS[1], KEYS[5]}
for i = 10, #KEYS do reads[#reads + 1] = KEYS[i] end
local found = redis.call('MGET', unpack(reads))
local idem_ttl = tonumber(ARGV[3])
if idem_ttl > 0 and found[1] then return {1, found[1]} end
if not found[2] then return {2} end
if not found[3] then
  -- The counter vanished under a live window: never restart at 1, rebuild instead.
  redis.call('DEL', KEYS[2], KEYS[3])
  return {2}
end
local in_outbox = ARGV[6] == 'd'
local bound = tonumber(ARGV[5])
if in_outbox and bound > 0 and redis.call('XLEN', KEYS[8]) >= bound then return {3} end
--GATE--
local offset = string.format('%d', redis.call('INCR', KEYS[1]))
local ms = string.format('%d', now_ms())
redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[2], offset .. '-0', 'm', ARGV[1], 't', ms)
if in_outbox then
  redis.call('XADD', KEYS[8], '*', 'm', ARGV[1], 'o', offset, 't', ms)
end
local publish = ARGV[12]
if publish ~= '' then
  -- Fanned out in the step that appends it: acknowledged means announced, whatever dies when.
  local at = cmsgpack.pack('offset', tonumber(offset), 'created_at', iso_ms(tonumber(ms)))
  redis.call(publish, ARGV[13], ARGV[14] .. at)
end
if idem_ttl > 0 then
  redis.call('SET', KEYS[4], ARGV[6] .. offset .. ':' .. ms .. ':' .. ARGV[1], 'PX', idem_ttl)
end
-- The window is a cache (a miss rebuilds it under a new epoch), so its TTLs move forward
-- every few appends, not on each: the rebuild gave all three keys theirs, and the counter's
-- stays twice the window's, so it never vanishes first.
local ttl = tonumber(ARGV[4])
if tonumber(offset) % tonumber(ARGV[7]) == 0 then
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
  redis.call('EXPIRE', KEYS[1], 2 * ttl)
end
local J = {KEYS[6], KEYS[7], KEYS[5]}
if ARGV[11] ~= '' then finish_job(J, ARGV[11]) end
local job = ARGV[8]
if job ~= '' then  -- a question: its reply job, in this same step
  local alone = found[4] and 0 or 1  -- no unfinished job of the conversation
  local followed = false
  if alone == 1 then
    --FOLLOW--
  end
  if type(followed) == 'table' then
    -- What the follow did stands for the job (AppendFollow): none is added.
    return {0, tonumber(offset), tonumber(ms), 1, followed, 1}
  end
  if ARGV[10] ~= '' then redis.call('SADD', KEYS[9], ARGV[10]) end
  add_job(J, job, offset, ARGV[9], ms, ARGV[1], ttl)
  return {0, tonumber(offset), tonumber(ms), alone, followed}
end
return {0, tonumber(offset), tonumber(ms)}
