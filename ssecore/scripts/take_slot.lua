-- Take one of an owner's slots, if one is free: drop the lapsed ones, count, add; one step, so two submits on two nodes
-- cannot both take the last one. Slots lapse after the record's lifetime, so a job that is lost (never ended, never
-- updated) cannot hold one for ever; Redis' clock decides, not the nodes'.
-- KEYS[1] the owner's set; ARGV: limit, lifetime ms, generation id. Returns 1 if taken.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
