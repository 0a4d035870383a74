-- The prelude of every script (storage.lua prepends it once): helpers shared by all of them.

-- Milliseconds on Redis' clock: every instance reads the same clock, so instances whose own
-- clocks are skewed still agree on leases, token buckets and message times. Read once per
-- script (a script is one atomic step): a gated append and its gate share one TIME.
local now_read
local function now_ms()
  if not now_read then
    local t = redis.call('TIME')
    now_read = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now_read
end

-- The reply-buffer scripts' KEYS[1] is a conversation's reply hash: true when its running
-- reply is generation `gid` streamed by instance `owner`.
local function owns(gid, owner)
  local f = redis.call('HMGET', KEYS[1], 'gid', 'owner')
  return f[1] == gid and f[2] == owner
end
