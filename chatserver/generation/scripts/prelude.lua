-- Shared by every reply-buffer script. KEYS[1] is always the conversation's reply hash.
-- True when the running reply is generation `gid` streamed by instance `owner`.
local function owns(gid, owner)
  local f = redis.call('HMGET', KEYS[1], 'gid', 'owner')
  return f[1] == gid and f[2] == owner
end
