-- What every presence script shares (spliced in at its --COMMON-- line).
-- KEYS[1]: the conversation's presence, a sorted set of "<instance>\0<user>" entries scored
-- by their expiry (ms on Redis' clock); an instance id never holds NUL (it comes from a flag
-- or the environment). KEYS[2]: its watchers, the instances with a member joined there.

local function user_of(entry)
  local at = string.find(entry, '\0', 1, true)
  return string.sub(entry, at + 1)
end

-- true when `user` has a live entry other than `except` (nil: any)
local function has_live(user, except, now)
  for _, entry in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
    if entry ~= except and user_of(entry) == user then
      return true
    end
  end
  return false
end

-- A change: 2 when another instance has a member joined (it must be told), else 1.
local function changed(me)
  for _, watcher in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    if watcher ~= me then
      return 2
    end
  end
  return 1
end
