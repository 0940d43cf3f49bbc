-- KEEP: renews a claim, if still ours. When the leader's own client is
-- gone (ARGV[3] = "1") and no replica follows, releases it instead.
--
-- KEYS[1] the claim   KEYS[2] followers per leader
-- ARGV[1] owner       ARGV[2] claim ttl_ms   ARGV[3] lone ("1" / "0")
--
-- Returns 1 (renewed) or 0 (released, or no longer ours).
assert(#KEYS == 2, 'KEEP takes 2 keys')
assert(#ARGV == 3, 'KEEP takes 3 arguments')
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == '1' and tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0') == 0 then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
