-- Load a conversation's window from the store's tail.
-- KEYS: seq, epoch, win, idem keys... ARGV: epoch, last offset, key ttl s, idem ttl ms, n,
-- then n triples (offset, payload, index of the idem key among KEYS[4..] or 0).
-- The messages are the store's contiguous tail ending at ARGV[2], at most `size` of them.
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local last = tonumber(ARGV[2])
local counter = tonumber(redis.call('GET', KEYS[1]) or '0')
-- Newer offsets than the store's tail exist (still in the outbox): hold nothing rather than
-- a run that does not reach the counter.
local keep = counter <= last
if counter > last then last = counter end
local ttl = tonumber(ARGV[3])
local idem_ttl = tonumber(ARGV[4])
redis.call('DEL', KEYS[3])
redis.call('SET', KEYS[1], string.format('%d', last), 'EX', 2 * ttl)
local added = 0
for i = 0, tonumber(ARGV[5]) - 1 do
  local offset = ARGV[6 + 3 * i]
  local payload = ARGV[7 + 3 * i]
  local idem = tonumber(ARGV[8 + 3 * i])
  if keep then
    redis.call('XADD', KEYS[3], offset .. '-0', 'm', payload)
    added = added + 1
  end
  if idem > 0 and idem_ttl > 0 then
    redis.call('SET', KEYS[3 + idem], 'd' .. offset .. '::' .. payload, 'NX', 'PX', idem_ttl)
  end
end
if added == 0 then
  -- An empty stream (added, then trimmed away), so that it exists with its TTL: the appends
  -- refresh TTLs only every few offsets, and a stream they created would have none.
  redis.call('XADD', KEYS[3], 'MAXLEN', 0, '0-1', 'm', '')
end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ttl)
redis.call('EXPIRE', KEYS[3], ttl)
return 1
