-- LOOKUP: looks a cacheable miss up and claims its call, in one round
-- trip: the shared cache's answer if it has one (and it is asked for),
-- else the claim if nobody holds it, else who holds it, this request then
-- registered as a follower of that leader, so its end (written to the log
-- only when a follower registered) cannot be missed by a follower still
-- joining. Each leader has a log of its own (named after it), so a
-- follower never takes another leader's entries for its own's.
--
-- KEYS[1] the answer in the shared cache
-- KEYS[2] the claim (its value: the leader)
-- KEYS[3] followers per leader (hash: leader -> count)
-- ARGV[1] read the cache ("1" / "0")   ARGV[2] this request's owner name
-- ARGV[3] claim ttl_ms                 ARGV[4] followers' ttl_ms
--
-- Returns {1, answer}, {2} (claimed for ARGV[2]) or {3, leader}.
assert(#KEYS == 3, 'LOOKUP takes 3 keys')
assert(#ARGV == 4, 'LOOKUP takes 4 arguments')
if ARGV[1] == '1' then
  local v = redis.call('GET', KEYS[1])
  if v then return {1, v} end
end
local o = redis.call('GET', KEYS[2])
if o then
  redis.call('HINCRBY', KEYS[3], o, 1)
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
  return {3, o}
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return {2}
