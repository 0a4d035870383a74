-- Take the conversation's reply slot in the question's own append, its job being alone in line
-- (a follow of the window's append: the body of a function of K, A, V and the question's
-- offset), and read the reply's context there too: the reply starts without a round trip.
-- K: reply hash, reply_next, watchers, this instance's replies, the window, its epoch. A: gid,
-- owner, agent, the model for a first question (offset 1), the model otherwise, reply_to, ttl
-- ms, this reply's member of the instance's replies, context size, the offset through which
-- the caller holds the context decoded (0: none), the epoch it read it under, the owner's
-- incarnation. V[2]:
-- reply_next, V[6]: the epoch.
-- Returns {1 + 2 * watched (as begin.lua), the context's entries newest first (only those
-- after the caller's offset when its epoch is the window's), the epoch, that offset (0: the
-- whole context)}, or 0 when the slot is held or promised to a waiter: the reply then takes
-- it as usual (begin.lua).
-- A slot taken here is the question's job (the append adds none): the hash keeps the
-- question's offset, and a sweep that finds it unstarted after its owner died runs it again
-- (claim.lua, leases.py).
if V[2] or redis.call('EXISTS', K[1]) == 1 then return 0 end
-- Listed as ours before the hash exists, as begin's caller does (a sweep finds it there).
redis.call('SADD', K[4], A[8])
local watched = 0
for _, member in ipairs(redis.call('SMEMBERS', K[3])) do
  if member ~= A[2] then watched = 1 break end
end
local model = offset == 1 and A[4] or A[5]
redis.call('HSET', K[1], 'gid', A[1], 'owner', A[2], 'agent', A[3], 'model', model,
           'reply_to', A[6], 'seq', 0, 'watched', watched, 'offset', offset, 'inc', A[12])
redis.call('PEXPIRE', K[1], A[7])
local after = tonumber(A[10])
if after > 0 and V[6] ~= A[11] then after = 0 end  -- rebuilt since: read it all
local low = after > 0 and ('(' .. after .. '-0') or '-'
return {1 + 2 * watched, redis.call('XREVRANGE', K[5], '+', low, 'COUNT', A[9]), V[6] or '',
        after}
