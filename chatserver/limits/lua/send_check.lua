-- A send's whole check, as the body of a function of K, A and V: run alone (gate_alone.lua) or
-- as the gate of the window's append (window_gate.lua), which then costs no round trip, and
-- whose MGET read both keys already (V).
-- Today's tokens (K[2]) against the quota (A[2]), then the token bucket (K[1]; capacity A[1],
-- messages per minute, refilled continuously): a string "<tokens> <ms>", so one MGET reads
-- both keys and one SET with its TTL writes the bucket. {0, 0}: go ahead; {1, ms} rate limited;
-- {2, 0} quota used up; {-1, 0}: today's counter does not exist yet (the caller seeds it from
-- the store and checks again).
local now = now_ms()
local found = V and {V[2], V[1]} or redis.call('MGET', K[2], K[1])
local used = found[1]
if not used then return {-1, 0} end
if tonumber(used) >= tonumber(A[2]) then return {2, 0} end
local capacity = tonumber(A[1])
local rate = capacity / 60000
local tokens, at = capacity, now
if found[2] then
  local t, a = string.match(found[2], '^(%S+) (%S+)$')
  tokens, at = tonumber(t), tonumber(a)
end
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) / rate) end
redis.call('SET', K[1], tostring(tokens) .. ' ' .. string.format('%d', now), 'PX', 120000)
if wait > 0 then return {1, wait} end
return {0, 0}
