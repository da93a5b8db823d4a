#!lua flags=no-writes
-- History after a position plus the metadata `check_position` needs, read atomically. Flagged read-only, so it runs
-- while writes are paused (CLIENT PAUSE WRITE during a failover) and on replicas.
-- KEYS[1] stream; ARGV[1] exclusive start ("(<id>"), ARGV[2] count (0: metadata only).
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local length, last_id, max_deleted, first, last_entry = 0, '0-0', '0-0', false, false
for i = 1, #info, 2 do
  local k = info[i]
  if k == 'length' then length = info[i + 1]
  elseif k == 'last-generated-id' then last_id = info[i + 1]
  elseif k == 'max-deleted-entry-id' then max_deleted = info[i + 1]
  elseif k == 'first-entry' then first = info[i + 1]
  elseif k == 'last-entry' then last_entry = info[i + 1] end
end
local closed, first_id = 0, ''
if first then first_id = first[1] end
if last_entry then
  local f = last_entry[2]
  for j = 1, #f, 2 do if f[j] == 'c' then closed = 1 end end
end
local entries = {}
if tonumber(ARGV[2]) > 0 then
  entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])
end
return {1, length, last_id, max_deleted, first_id, closed, entries}
