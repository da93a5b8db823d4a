-- A running generation keeps its owner's slot for as long as its record lives, counted, like the slot taken at submit
-- (take_slot.lua), on Redis' clock: a worker whose clock is off must not shorten or stretch it. Sent with EVAL, as it
-- goes into the same pipeline as the record (on a cluster too, where a pipeline cannot load a script first).
-- KEYS[1] the owner's set; ARGV[1] lifetime ms, ARGV[2] generation id.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[1], 'GT')
return 1
