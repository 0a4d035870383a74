-- A gate (the body of a function of K, A and V) run on its own, with the script's keys and
-- args; V is nil: the gate reads its keys itself.
return (function(K, A, V)
--BODY--
end)(KEYS, ARGV, nil)
