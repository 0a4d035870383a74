-- The reply's own append releases its entry in the same step (a gate of the window's append,
-- as the body of a function of K, A and V): if generation A[1] still holds the slot, delete
-- the hash (K[1]) and the text (K[2]). Never refuses: a claimed reply's store goes ahead.
if redis.call('HGET', K[1], 'gid') == A[1] then redis.call('DEL', K[1], K[2]) end
return {0, 0}
