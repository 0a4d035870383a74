-- What window_append.lua runs at its follow line when a follow is given, right after a
-- question's job was added alone in line: the follow is the body of a function of K, A, V and
-- the question's offset, its keys and args the ones after the gate's, V the values of its
-- keys that the append's MGET read (false where a key holds no string). A table it returns
-- stands for the question's job (none is added) and is the append's fifth element.
do
  local gate_keys, gate_args = tonumber(ARGV[15]), tonumber(ARGV[16])
  local K, A, V = {}, {}, {}
  for i = 10 + gate_keys, #KEYS do
    K[#K + 1] = KEYS[i]
    V[#K] = found[4 + gate_keys + #K]
  end
  for i = 17 + gate_args, #ARGV do A[#A + 1] = ARGV[i] end
  followed = (function(K, A, V, offset)
--BODY--
  end)(K, A, V, tonumber(offset))
end
