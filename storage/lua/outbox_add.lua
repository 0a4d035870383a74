-- Check the bound and add in one step. KEYS: stream. ARGV: max, then field/value pairs.
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
return 1
