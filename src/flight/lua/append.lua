-- APPEND: adds a batch of a leader's entries to its log and renews the
-- log's expiry, at once (a connection reset between the two would leave a
-- log that never expires).
--
-- KEYS[1] the leader's log
-- ARGV[1] log ttl_ms
-- ARGV[2..] entries: "h", head code, upstream name | "e", event bytes, mark code
--
-- Returns the number of entries added.
assert(#KEYS == 1, 'APPEND takes 1 key')
assert(#ARGV >= 3, 'APPEND takes a ttl and at least one entry')
local i, n = 2, 0
while i <= #ARGV do
  if ARGV[i] == 'h' then
    redis.call('XADD', KEYS[1], '*', 'h', ARGV[i + 1], 'u', ARGV[i + 2])
    i = i + 3
  else
    redis.call('XADD', KEYS[1], '*', 'e', ARGV[i + 1], 'm', ARGV[i + 2])
    i = i + 3
  end
  n = n + 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return n
