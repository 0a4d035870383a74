-- Cluster path: the message of this record reached the outbox. An expired record stays gone.
-- KEYS: the idempotency record.
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('SETRANGE', KEYS[1], 0, 'd') end
return 1
