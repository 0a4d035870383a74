-- A gate (the body of a function of K and A) run on its own, with the script's keys and args.
return (function(K, A)
--BODY--
end)(KEYS, ARGV)
