-- Delete a channel, and with it its fence and owner, and ring its shard channel with `d`, in one step; a name that has
-- no stream (a generation's channel reserved, not yet written) keeps its owner: its queued job still writes it, and
-- must not write an unowned channel. With ARGV[2] "1", only if the owner mark is ARGV[3] ("": none), in the same step.
-- KEYS[1] stream, KEYS[2] fence, KEYS[3] owner; ARGV[1] the ring channel suffix, ARGV[2] check flag, ARGV[3] owner.
if ARGV[2] == '1' and (redis.call('GET', KEYS[3]) or '') ~= ARGV[3] then return 0 end
local n = redis.call('DEL', KEYS[1])
if n == 1 then
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.pcall('SPUBLISH', KEYS[1] .. ARGV[1], 'd')
end
return n
