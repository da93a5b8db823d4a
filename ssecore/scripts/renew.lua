-- Renew only the entries this consumer still holds: a plain XCLAIM would take a job back from the worker that took it
-- over. KEYS[1] jobs; ARGV: group, consumer, entry ids. Returns the ids no longer held.
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 1 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
