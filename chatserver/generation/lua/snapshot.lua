-- The running reply for a join: {gid, seq, text, owner, watched, the owner's incarnation},
-- or false. KEYS: reply hash, reply text
local f = redis.call('HMGET', KEYS[1], 'gid', 'seq', 'owner', 'watched', 'inc')
if not f[1] then return false end
return {f[1], f[2], redis.call('GET', KEYS[2]) or '', f[3], f[4] or '0', f[5] or ''}
