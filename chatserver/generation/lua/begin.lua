-- Take a conversation's reply slot.
-- KEYS: reply hash, reply text, reply_next, watchers
-- ARGV: gid, owner, agent, model, reply_to, ttl ms, waiter ms, the owner's incarnation
-- Returns 0 when refused, else 1 + 2 * watched (watched: another instance has a member in).
local cur = redis.call('HGET', KEYS[1], 'gid')
local waiting = redis.call('GET', KEYS[3])
if cur and cur ~= ARGV[1] then
  -- Taken: the first to wait is next. Else an instance whose sender asks again at once
  -- would take the slot back each time, before a waiter's next try (it polls), for ever.
  if not waiting then
    redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[7])
  elseif waiting == ARGV[1] then
    redis.call('PEXPIRE', KEYS[3], ARGV[7])
  end
  return 0
end
if waiting and waiting ~= ARGV[1] then return 0 end  -- free, but promised to the waiter
if waiting then redis.call('DEL', KEYS[3]) end
-- Begun again (a run that failed, now a job): no longer a slot its question's append took.
if cur then redis.call('HDEL', KEYS[1], 'offset') end
local watched = 0
for _, member in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  if member ~= ARGV[2] then watched = 1 break end
end
redis.call('HSET', KEYS[1], 'gid', ARGV[1], 'owner', ARGV[2], 'agent', ARGV[3],
           'model', ARGV[4], 'reply_to', ARGV[5], 'seq', 0, 'watched', watched, 'inc', ARGV[8])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
-- No text key yet: the first record creates it (with the hash's TTL). None is left over
-- from an earlier reply: every release and claim deletes both keys, and a text only ever
-- gets the TTL its hash has.
return 1 + 2 * watched
