-- A consistent read of one conversation's hot window.
-- KEYS: epoch, seq, win. ARGV: max id, min id, count (0: no messages).
-- Returns nil when the window is missing, else {epoch, last offset, first id or "", entries}.
local epoch = redis.call('GET', KEYS[1])
if not epoch then return false end
local last = redis.call('GET', KEYS[2]) or '0'
local first = ''
local head = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 1)
if #head > 0 then first = head[1][1] end
local entries = {}
if tonumber(ARGV[3]) > 0 then
  entries = redis.call('XREVRANGE', KEYS[3], ARGV[1], ARGV[2], 'COUNT', ARGV[3])
end
return {epoch, last, first, entries}
