-- Renew the leases of the jobs a holder still has among ARGV[3..] (idle time back to 0),
-- never taking one that another holder claimed meanwhile. KEYS: jobs stream.
-- ARGV: holder, at most this many pending, job ids. Returns the ids renewed.
local mine = redis.pcall('XPENDING', KEYS[1], 'repliers', '-', '+', ARGV[2], ARGV[1])
if mine.err then
  redis.call('XGROUP', 'CREATE', KEYS[1], 'repliers', '0', 'MKSTREAM')  -- lost with the data
  return {}
end
local wanted = {}
for i = 3, #ARGV do wanted[ARGV[i]] = true end
local args = {'XCLAIM', KEYS[1], 'repliers', ARGV[1], 0}
local ids = {}
for _, entry in ipairs(mine) do
  if wanted[entry[1]] then
    ids[#ids + 1] = entry[1]
    args[#args + 1] = entry[1]
  end
end
if #ids == 0 then return {} end
args[#args + 1] = 'JUSTID'
redis.call(unpack(args))
return ids
