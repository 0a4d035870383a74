-- KEYS: jobs stream. Returns {jobs outstanding, age of the oldest in ms}.
local len = redis.call('XLEN', KEYS[1])
if len == 0 then return {0, 0} end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local ms = tonumber(string.match(first[1][1], '^(%d+)'))
return {len, math.max(0, now_ms() - ms)}
