-- RELEASE: gives up a claim, if still ours.
--
-- KEYS[1] the claim   ARGV[1] owner
--
-- Returns the number of keys deleted (0 or 1).
assert(#KEYS == 1, 'RELEASE takes 1 key')
assert(#ARGV == 1, 'RELEASE takes 1 argument')
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
