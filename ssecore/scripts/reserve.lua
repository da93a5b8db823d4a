-- Make a channel that does not exist a generation's (see backend.reserve). Nothing is rung: streams opened on the name
-- before are checked against the owner when its first entries reach them (see hub.fanout). KEYS[1] stream, KEYS[2]
-- owner; ARGV[1] owner, ARGV[2] ttl_ms.
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
