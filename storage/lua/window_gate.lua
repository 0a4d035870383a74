-- What window_append.lua runs at its gate line when a gate is given: the gate is the body of a
-- function of K, A and V, its keys and args the ones after the append's, V the values of its
-- keys that the append's MGET read (false where a key holds no string). It returns
-- {code, value}: 0 goes ahead, anything else refuses the append with {4, code, value}.
do
  local K, A, V = {}, {}, {}
  for i = 10, 9 + tonumber(ARGV[15]) do
    K[#K + 1] = KEYS[i]
    V[#K] = found[4 + #K]
  end
  for i = 17, 16 + tonumber(ARGV[16]) do A[#A + 1] = ARGV[i] end
  local verdict = (function(K, A, V)
--BODY--
  end)(K, A, V)
  if tonumber(verdict[1]) ~= 0 then return {4, verdict[1], verdict[2]} end
end
