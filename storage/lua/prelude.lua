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

-- `ms` (Unix ms) as protocol.timestamp_from_ms writes it: 2026-11-27T20:13:30.123Z, UTC.
-- The days to a civil date as in H. Hinnant's days_from_civil, inverted (proleptic Gregorian).
local function iso_ms(ms)
  local s = math.floor(ms / 1000)
  local days = math.floor(s / 86400)
  local secs = s - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local day = doy - math.floor((153 * mp + 2) / 5) + 1
  local month = mp < 10 and mp + 3 or mp - 9
  local year = yoe + era * 400 + (month <= 2 and 1 or 0)
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%03dZ', year, month, day,
    math.floor(secs / 3600), math.floor(secs % 3600 / 60), secs % 60, ms - s * 1000)
end

-- The reply-buffer scripts' KEYS[1] is a conversation's reply hash: true when its running
-- reply is generation `gid` streamed by instance `owner`.
local function owns(gid, owner)
  local f = redis.call('HMGET', KEYS[1], 'gid', 'owner')
  return f[1] == gid and f[2] == owner
end

-- Reply jobs (storage/jobs/redis.py). A conversation's unfinished jobs are three keys, `J`:
-- J[1] a sorted set of the job ids by offset (the order), J[2] a hash of each job's
-- cmsgpack {holder, ms, question payload}, J[3] their count as a string, which the window's
-- append reads with its MGET (no count: no job, the question is alone in line). Adding or
-- finishing one is O(log n), however many are queued.
local function add_job(J, id, offset, holder, ms, payload, ttl)
  -- Its latest adder holds it. Counted once: a job added again (a retried append whose
  -- follow may have stood for it, a reply failed on two instances) keeps the count true,
  -- else its conversation's questions would never again be alone in line.
  local added = redis.call('ZADD', J[1], tonumber(offset), id)
  redis.call('HSET', J[2], id, cmsgpack.pack({holder, tonumber(ms), payload}))
  if added == 0 then return 0 end
  local n = redis.call('INCR', J[3])
  -- `ttl` (s) bounds jobs nobody would ever finish (their holders' registries lost): set
  -- with the first job and every 16th, not with each.
  if n % 16 == 1 then
    for i = 1, 3 do redis.call('EXPIRE', J[i], ttl) end
  end
  return n == 1 and 1 or 0
end

-- A job answered: out of the conversation's jobs. Returns 1 when it was there (0: done).
local function finish_job(J, id)
  if redis.call('ZREM', J[1], id) == 0 then return 0 end
  redis.call('HDEL', J[2], id)
  if redis.call('DECR', J[3]) <= 0 then redis.call('DEL', J[3]) end
  return 1
end
