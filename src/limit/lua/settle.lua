-- SETTLE: a tenant's charges on one replica, exactly once, and that
-- replica's in-flight count (one fewer, or an absolute report that also
-- renews its lease).
--
-- Charges travel as cumulative totals of one ledger (a replica's record of
-- one tenant's limits): the tokens it debited and the USD it spent in a
-- period since it started, and how much of each Redis has confirmed. The
-- ledger's key remembers the last total applied, so a total sent again
-- (a retry after a round trip that timed out but ran here) or out of order
-- adds nothing, and one sent after failures adds everything they carried.
-- A ledger Redis no longer knows (expired, or Redis restarted empty) adds
-- what its replica has not had confirmed.
--
-- KEYS[1] token bucket   KEYS[2] concurrency hash   KEYS[3] live set
-- KEYS[4] spend of ARGV[9]'s period (the token bucket again without one)
-- KEYS[5] the ledger (hash: "tok" and "usd:<period>" -> last total applied)
-- ARGV[1] tokens_per_minute
-- ARGV[2] replica
-- ARGV[3] what to do with the count: "" nothing; "release" (one fewer)
--         or "report" (renewing the lease): the count is ARGV[5]
-- ARGV[4] version   ARGV[5] count   ARGV[6] lease ttl_ms
-- ARGV[7] tokens debited in all   ARGV[8] of which confirmed
-- ARGV[9] period ("" none)   ARGV[10] USD spent in it in all
-- ARGV[11] of which confirmed   ARGV[12] when the spend key expires (Unix ms)
-- ARGV[13] the ledger's ttl_ms
--
-- Returns 1.
assert(#KEYS == 5, 'SETTLE takes 5 keys')
assert(#ARGV == 13, 'SETTLE takes 13 arguments')

charge(KEYS[1], KEYS[4], KEYS[5], tonumber(ARGV[1]), ARGV[7], ARGV[8], ARGV[9], ARGV[10],
  ARGV[11], ARGV[12], ARGV[13])

local replica, what, version = ARGV[2], ARGV[3], tonumber(ARGV[4])
if what ~= '' then
  set_count(KEYS[2], replica, version, ARGV[5])
  if what == 'report' then
    alive(KEYS[2], KEYS[3], replica, tonumber(ARGV[6]))
  elseif redis.call('PTTL', KEYS[2]) < 0 then
    -- A release may find the hash gone (expired): never leave it without one.
    redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[6]) * 2)
  end
end
return 1
