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

-- Reply jobs (storage/jobs/redis.py): a conversation's unfinished jobs, oldest first, in one
-- string `listed` (read by the caller's MGET, passed here as `raw`): one flat msgpack array
-- of (job id, offset, holder, ms, payload) per job. A conversation holds few at once (its
-- questions queued behind a running reply), so a job costs the write of that string only.
local JOB_FIELDS = 5

local function jobs_in(raw)
  if not raw then return {} end
  return cmsgpack.unpack(raw)
end

-- Writes what is left (none: the key goes), keeping the key's TTL.
local function jobs_put(listed, jobs)
  if #jobs == 0 then
    redis.call('DEL', listed)
  else
    redis.call('SET', listed, cmsgpack.pack(jobs), 'KEEPTTL')
  end
end

-- Adds a job held by `holder`; `ttl` (s) bounds a listing nobody ever finishes (lost holders'
-- registries). Returns 1 when it is alone (no older job of the conversation is unfinished:
-- it may go without asking for its turn), else 0.
local function add_job(listed, raw, id, offset, holder, ms, payload, ttl)
  local jobs = jobs_in(raw)
  local alone = #jobs == 0 and 1 or 0
  local n = #jobs
  jobs[n + 1] = id
  jobs[n + 2] = tonumber(offset)
  jobs[n + 3] = holder
  jobs[n + 4] = tonumber(ms)
  jobs[n + 5] = payload
  redis.call('SET', listed, cmsgpack.pack(jobs), 'EX', ttl)
  return alone
end

-- A job answered: out of the listing. Returns 1 when it was listed (0: done before).
local function finish_job(listed, raw, id)
  local jobs = jobs_in(raw)
  for i = 1, #jobs, JOB_FIELDS do
    if jobs[i] == id then
      for _ = 1, JOB_FIELDS do table.remove(jobs, i) end
      jobs_put(listed, jobs)
      return 1
    end
  end
  return 0
end
