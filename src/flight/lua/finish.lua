-- FINISH: ends a led flight in one round trip: the end into the leader's
-- log if a replica follows it (else the log goes), the answer into the
-- shared cache (a done end with a cache ttl: the cache decided the ttl and
-- encoded the answer, ARGV[5]), and the claim released if still ours --
-- all at once, so a request that finds the call unclaimed finds the
-- answer stored.
--
-- KEYS[1] the claim   KEYS[2] the leader's log   KEYS[3] followers per leader
-- KEYS[4] the answer in the shared cache
-- ARGV[1] owner   ARGV[2] log ttl_ms   ARGV[3] cache ttl_ms (0: not stored)
-- ARGV[4..] the end's fields and values (ARGV[4] = 'd': a done end, whose
--           answer is ARGV[5], and 'u', the upstream that answered)
--
-- Returns 1.
assert(#KEYS == 4, 'FINISH takes 4 keys')
assert(#ARGV >= 5, 'FINISH takes at least 5 arguments')
if tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0') > 0 then
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
else
  redis.call('DEL', KEYS[2])
end
if tonumber(ARGV[3]) > 0 and ARGV[4] == 'd' then
  redis.call('SET', KEYS[4], ARGV[5], 'PX', ARGV[3])
end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
