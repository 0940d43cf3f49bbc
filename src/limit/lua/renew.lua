-- RENEW: one replica's periodic round trip for a tenant without a
-- concurrency cap (every 250 ms while the tenant is busy on it): applies the
-- ledger's charges, tops up or gives back its share of the request bucket,
-- and reads the token balance and spend those charges leave.
--
-- KEYS[1] request bucket   KEYS[2] token bucket   KEYS[3] lessees
-- KEYS[4] spend of the current period (the token bucket again without a budget)
-- KEYS[5] the ledger (hash: "tok" and "usd:<period>" -> last total applied)
-- ARGV[1] requests_per_minute   ARGV[2] request_burst
-- ARGV[3] tokens_per_minute     ARGV[4] replica
-- ARGV[5] lessee ttl_ms         ARGV[6] budgeted ("1" / "0")
-- ARGV[7] requests wanted (a top-up of the share; 0 = none)
-- ARGV[8] requests given back (the unused share of a replica going idle)
-- ARGV[9] k (as in ADMIT)
-- ARGV[10] tokens debited in all   ARGV[11] of which confirmed
-- ARGV[12] period of the spend below ("" none: the current period's key)
-- ARGV[13] USD spent in it in all  ARGV[14] of which confirmed
-- ARGV[15] when the spend key expires (Unix ms)   ARGV[16] the ledger's ttl_ms
--
-- Returns {granted, requests remaining, requests reset_us, token balance
-- ("" = no limit), spend ("" = no budget)}.
assert(#KEYS == 5, 'RENEW takes 5 keys')
assert(#ARGV == 16, 'RENEW takes 16 arguments')
local rpm, burst, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local want, back, k = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
charge(KEYS[2], KEYS[4], KEYS[5], tpm, ARGV[10], ARGV[11], ARGV[12], ARGV[13], ARGV[14],
  ARGV[15], ARGV[16])
local granted, remaining, reset = 0, 0, 0
if rpm > 0 then
  local tat, period, held = bucket(KEYS[1], rpm, burst)
  if back > 0 then
    -- An unused share comes back, as if never taken (never past full).
    tat = math.max(tat - back * period, now)
    if tat > now then
      redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
    else
      redis.call('DEL', KEYS[1])
    end
    held = math.floor(burst - (tat - now) / period)
  end
  if want > 0 then
    local n = lessees(KEYS[3], ARGV[4], tonumber(ARGV[5]))
    granted = math.max(0, math.min(want, share(held, n, k), held))
    if granted > 0 then tat = take(KEYS[1], tat, period, granted) end
  end
  remaining, reset = held - granted, math.ceil(tat - now)
end
local tokens = ''
if tpm > 0 then tokens = string.format('%.3f', balance(KEYS[2], tpm)) end
local spent = ''
if ARGV[6] == '1' then spent = redis.call('GET', KEYS[4]) or '0' end
return {granted, remaining, reset, tokens, spent}
