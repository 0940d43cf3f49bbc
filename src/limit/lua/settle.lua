-- SETTLE: a settled request's token debit and spend, and this replica's
-- in-flight count (one fewer, or an absolute report that also renews its
-- lease).
--
-- KEYS[1] token bucket   KEYS[2] concurrency hash   KEYS[3] live set
-- KEYS[4] spend of a period
-- ARGV[1] tokens_per_minute   ARGV[2] tokens to debit   ARGV[3] replica
-- ARGV[4] what to do with the count: "" nothing, "release" one fewer,
--         "report" the count is ARGV[6]
-- ARGV[5] version   ARGV[6] count   ARGV[7] lease ttl_ms
-- ARGV[8] USD to add to the spend   ARGV[9] when the spend key expires (Unix ms)
--
-- Returns 1.
assert(#KEYS == 4, 'SETTLE takes 4 keys')
assert(#ARGV == 9, 'SETTLE takes 9 arguments')
local usd = tonumber(ARGV[8])
if usd > 0 then
  redis.call('INCRBYFLOAT', KEYS[4], ARGV[8])
  redis.call('PEXPIREAT', KEYS[4], ARGV[9])
end
local tpm, used = tonumber(ARGV[1]), tonumber(ARGV[2])
if tpm > 0 and used > 0 then
  local b = math.max(balance(KEYS[1], tpm) - used, -tpm * 1440)
  redis.call('HSET', KEYS[1], 'b', string.format('%.3f', b), 't', string.format('%.0f', now))
  redis.call('PEXPIRE', KEYS[1], math.ceil((tpm - b) * 60000 / tpm) + 1000)
end
local replica, what, version = ARGV[3], ARGV[4], tonumber(ARGV[5])
if what == 'release' then
  local base, newest = marks(KEYS[2], replica)
  change(KEYS[2], replica, version, -1, base, newest)
elseif what == 'report' then
  local base, newest = marks(KEYS[2], replica)
  if version > base and version >= newest then
    redis.call('HSET', KEYS[2], replica, ARGV[6], replica .. ':b', string.format('%.0f', version))
  end
  alive(KEYS[2], KEYS[3], replica, tonumber(ARGV[7]))
end
return 1
