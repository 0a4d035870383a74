-- Take a dead instance's reply: only if generation ARGV[1] of owner ARGV[2] still holds it,
-- so of several instances sweeping at once exactly one wins.
-- KEYS: reply hash, reply text. ARGV: gid, the dead owner, the claimer, ttl ms, the
-- claimer's incarnation.
-- A reply whose slot its question's append took (the hash has the question's `offset`: the
-- slot is the question's job) and of which nothing was recorded is kept, owned by the
-- claimer, who runs it again; any other is deleted, for the claimer to end.
-- Returns {agent, model, reply_to, seq, text, offset or false, 1: kept}, or false.
if not owns(ARGV[1], ARGV[2]) then return false end
local f = redis.call('HMGET', KEYS[1], 'agent', 'model', 'reply_to', 'seq', 'offset')
local text = redis.call('GET', KEYS[2]) or ''
if f[5] and tonumber(f[4]) == 0 and text == '' then
  redis.call('HSET', KEYS[1], 'owner', ARGV[3], 'inc', ARGV[5])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {f[1], f[2], f[3], f[4], text, f[5], 1}
end
redis.call('DEL', KEYS[1], KEYS[2])
return {f[1], f[2], f[3], f[4], text, f[5], 0}
