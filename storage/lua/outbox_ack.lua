-- Acknowledge written entries and delete them, in one step (one command of the caller's
-- batch). KEYS: stream. ARGV: group, then entry ids. In slices: unpack() of more values than
-- Lua's C stack holds (LUAI_MAXCSTACK, 8000) fails, and a batch may be 10,000.
local n = #ARGV
for i = 2, n, 1000 do
  local last = math.min(i + 999, n)
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, i, last))
  redis.call('XDEL', KEYS[1], unpack(ARGV, i, last))
end
return n - 1
