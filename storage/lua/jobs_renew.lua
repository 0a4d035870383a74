-- Renew the leases of every job a holder has (idle time back to 0), without taking any
-- from another holder. KEYS: jobs stream. ARGV: holder, at most this many.
-- Returns the ids renewed.
local mine = redis.pcall('XPENDING', KEYS[1], 'repliers', '-', '+', ARGV[2], ARGV[1])
if mine.err then
  redis.call('XGROUP', 'CREATE', KEYS[1], 'repliers', '0', 'MKSTREAM')  -- lost with the data
  return {}
end
if #mine == 0 then return {} end
local args = {'XCLAIM', KEYS[1], 'repliers', ARGV[1], 0}
local ids = {}
for i, entry in ipairs(mine) do
  ids[i] = entry[1]
  args[#args + 1] = entry[1]
end
args[#args + 1] = 'JUSTID'
redis.call(unpack(args))
return ids
