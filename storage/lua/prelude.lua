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

-- A reply job (storage/jobs/redis.py): an entry of the jobs stream, in the pending list of
-- the group `repliers` under `holder` from the start (nobody reads new entries: jobs are
-- only ever claimed), and listed by offset in the conversation's jobs (`listed`, when in
-- this script's slot) with score 2 * offset, made odd once its holder announced it (at
-- once when `announced`: the append that adds it published the question).
-- Returns the job's id and 1 when it is alone in the listing (no older job of the
-- conversation is unfinished: it may go without asking for its turn), else 0.
local function add_job(stream, listed, holder, payload, offset, ms, ttl, announced)
  local id = redis.call('XADD', stream, '*', 'm', payload, 'o', offset, 't', ms)
  if redis.pcall('XCLAIM', stream, 'repliers', holder, 0, id, 'FORCE', 'JUSTID').err then
    redis.call('XGROUP', 'CREATE', stream, 'repliers', '0')  -- lost with Redis' data
    redis.call('XCLAIM', stream, 'repliers', holder, 0, id, 'FORCE', 'JUSTID')
  end
  local alone = 0
  if listed then
    redis.call('ZADD', listed, 2 * tonumber(offset) + (announced and 1 or 0), id)
    -- Alone: the listing was just created, so it needs its TTL. Else it has one (set when
    -- it was created, days long) and an older job (maybe a stale entry, which the turn
    -- check drops) is listed: the caller asks for its turn.
    if redis.call('ZCARD', listed) == 1 then
      redis.call('EXPIRE', listed, ttl)
      alone = 1
    end
  end
  return id, alone
end

-- A job answered: out of the conversation's listing (`listed`, when in this script's slot)
-- and out of the stream and its pending list. Returns the entries deleted (0: done before).
local function finish_job(stream, listed, id)
  if listed then redis.call('ZREM', listed, id) end
  redis.call('XACK', stream, 'repliers', id)
  return redis.call('XDEL', stream, id)
end
