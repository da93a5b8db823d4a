-- Reject appends to a closed channel and add the events in one atomic step, so no node can append after the end marker.
-- Trimming is done here rather than with `XADD MAXLEN ~`, because Redis does not record what trimming removed, and
-- resuming clients must be told exactly when their position fell off the history: after trimming, the id of the newest
-- removed entry is stored with `XSETID ... MAXDELETEDID`. Like `~`, it trims in batches (slack) to stay cheap.
-- Each entry also stores `p`, the id before it, so the live tail can prove it skipped nothing.
-- A generation's channel (its owner key exists; see backend.reserve) takes fenced appends only, its worker's: checked
-- here, in the same step as the append, so no publisher can slip an event in between a submit and the worker's start.
-- With a fence (producers only; see backend.Fence) the writer must hold, or may take, the channel's fence hash. A take
-- that names the channel's owner finds it still there (the name's reservation not undone, deleted or lapsed) or writes
-- nothing: checked on the take alone, the first append of a run, not on every token.
-- With an idempotency key (publishers; see backend.Idempotency), a key seen within its window answers the ids it was
-- given, as `=` then the ids, and appends nothing; it is checked first, so the retry of a closing append is answered.
-- A WAIT after that answer, on any connection, covers the first append: since Redis 7.0 WAIT waits for the replication
-- offset of the connection's last command, a read included, not only of its last write.
-- KEYS[1] stream, KEYS[2] fence, KEYS[3] owner, KEYS[4] idempotency key (the fence and idempotency keys used only
-- when their modes say so); ARGV: maxlen, ttl_ms, close flag ("1"/"0"), fence mode ("", "take", "check"), fence
-- owner, fence attempt, idempotency fingerprint ("": none), idempotency window ms, ring channel suffix, the
-- channel owner a take expects ("": none), the run's last stored id a check expects ("": none; see Fence.after), then
-- event/data pairs.
local TRIM_SLACK = 100  -- set when loaded: ssecore.backend.TRIM_SLACK_MAX
local owned = redis.call('EXISTS', KEYS[3]) == 1
if owned and ARGV[4] == '' then return redis.error_reply('OWNED the channel belongs to a generation') end
if ARGV[7] ~= '' then
  local seen = redis.call('GET', KEYS[4])
  if seen then
    local sep = string.find(seen, ' ', 1, true)
    if string.sub(seen, 1, sep - 1) ~= ARGV[7] then
      return redis.error_reply('IDEMPOTENCY the key was used for other events')
    end
    local out = {'='}
    for id in string.gmatch(string.sub(seen, sep + 1), '[^ ]+') do out[#out + 1] = id end
    return out
  end
end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then
  local f = last[1][2]
  for i = 1, #f, 2 do
    if f[i] == 'c' then return redis.error_reply('CLOSED channel is closed') end
  end
end
if ARGV[4] ~= '' then
  local held = redis.call('HMGET', KEYS[2], 'o', 'a')
  local attempt = tonumber(ARGV[6])
  if ARGV[4] == 'take' then
    if ARGV[10] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[10] then
      return redis.error_reply('LOST the channel lost its owner')
    end
    if held[1] and (held[1] ~= ARGV[5] or tonumber(held[2]) > attempt) then
      return redis.error_reply('FENCED another run holds the channel')
    end
    redis.call('HSET', KEYS[2], 'o', ARGV[5], 'a', attempt)
  elseif held[1] ~= ARGV[5] or tonumber(held[2]) ~= attempt then
    return redis.error_reply('FENCED another run holds the channel')
  end
  if ARGV[11] ~= '' and (#last == 0 or last[1][1] ~= ARGV[11]) then
    return redis.error_reply('REWOUND the channel lost events of this run')
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
local ids = {}
local prev = '0-0'
if #last > 0 then prev = last[1][1] end
local first_prev = prev
local n = (#ARGV - 11) / 2
for i = 1, n do
  local ev, d = ARGV[10 + 2 * i], ARGV[11 + 2 * i]
  if i == n and ARGV[3] == '1' then
    prev = redis.call('XADD', KEYS[1], '*', 'e', ev, 'd', d, 'p', prev, 'c', '1')
  else
    prev = redis.call('XADD', KEYS[1], '*', 'e', ev, 'd', d, 'p', prev)
  end
  ids[i] = prev
end
local maxlen = tonumber(ARGV[1])
local excess = redis.call('XLEN', KEYS[1]) - maxlen
if excess >= math.min(TRIM_SLACK, maxlen) then
  local gone = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', excess)
  redis.call('XTRIM', KEYS[1], 'MAXLEN', maxlen)
  redis.call('XSETID', KEYS[1], ids[n], 'MAXDELETEDID', gone[#gone][1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if owned then redis.call('PEXPIRE', KEYS[3], ARGV[2]) end
if ARGV[7] ~= '' then
  redis.call('SET', KEYS[4], ARGV[7] .. ' ' .. table.concat(ids, ' '), 'PX', ARGV[8])
end
-- Every append rings the stream's own shard channel (see RedisBackend.ring_channel: the stream key, plus the database
-- number unless it is 0, so in the stream's slot on a cluster) with the entries it added:
-- `[prev, close flag, id, event, data, id, event, data, ...]`. Tail readers subscribed to it deliver from the ring
-- alone; see _TailReader. ARGV[9] is the suffix that makes the ring channel's name from the stream key.
-- `pcall`: the entries are stored by then, and a ring refused (an ACL user without the channel) must not turn a stored
-- append into an error that a retry would repeat. Such a user's tail cannot subscribe either, and says so.
local ring = {first_prev, ARGV[3]}
for i = 1, n do
  ring[#ring + 1] = ids[i]
  ring[#ring + 1] = ARGV[10 + 2 * i]
  ring[#ring + 1] = ARGV[11 + 2 * i]
end
redis.pcall('SPUBLISH', KEYS[1] .. ARGV[9], cjson.encode(ring))
return ids
