-- May this job run now? Marks it announced (its holder fanned the question out).
-- KEYS: the conversation's jobs[, jobs stream: when in this slot, stale listings are
-- dropped]. ARGV: job id, offset.
-- Returns {go, announced before this call[, the older job holding it back[, 1: the caller
-- checks that one is still in the stream (a cluster: another slot)]]}.
-- The odd score marks it announced: changed only when listed (XX) with the even score (GT);
-- not listed means done already, nothing to announce.
local marked = redis.call('ZADD', KEYS[1], 'XX', 'GT', 'CH', 2 * tonumber(ARGV[2]) + 1, ARGV[1])
local announced = 1 - marked
local below = '(' .. (2 * tonumber(ARGV[2]))
while true do
  local head = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', below, 'LIMIT', 0, 1)
  if #head == 0 then return {1, announced} end
  if not KEYS[2] then return {0, announced, head[1], 1} end  -- the caller checks the head
  if #redis.call('XRANGE', KEYS[2], head[1], head[1]) > 0 then return {0, announced, head[1]} end
  redis.call('ZREM', KEYS[1], head[1])  -- its entry is gone: it holds nobody back
end
