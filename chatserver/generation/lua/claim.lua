-- Take a dead instance's reply: only if generation ARGV[1] of owner ARGV[2] still holds it,
-- so of several instances sweeping at once exactly one wins.
-- KEYS: reply hash, reply text
if not owns(ARGV[1], ARGV[2]) then return false end
local f = redis.call('HMGET', KEYS[1], 'agent', 'model', 'reply_to', 'seq')
local text = redis.call('GET', KEYS[2]) or ''
redis.call('DEL', KEYS[1], KEYS[2])
return {f[1], f[2], f[3], f[4], text}
