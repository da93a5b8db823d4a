-- Undo a reserve (see backend.release): the owner mark goes only if it is still ARGV[1]'s and nothing was written.
-- KEYS[1] stream, KEYS[2] owner; ARGV[1] owner.
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
return 1
