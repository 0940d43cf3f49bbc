-- ADMIT: a request of a tenant without a concurrency cap that this replica
-- could not decide from its share (none left, or its view of the token
-- balance and spend too old). Takes the request and a new share of the
-- request bucket, and reads the token balance and the spend, in one round
-- trip.
--
-- KEYS[1] request bucket (GCRA: the theoretical arrival time)
-- KEYS[2] token bucket (hash: b = balance, t = when)
-- KEYS[3] lessees (replica -> share lease end, Unix us)
-- KEYS[4] spend of the current period (the token bucket again without a budget)
-- ARGV[1] requests_per_minute   ARGV[2] request_burst
-- ARGV[3] tokens_per_minute     ARGV[4] replica
-- ARGV[5] lessee ttl_ms         ARGV[6] budgeted ("1" / "0")
-- ARGV[7] requests needed now (0 or 1)
-- ARGV[8] requests wanted in all (needed, and a share to spend locally)
-- ARGV[9] k: a share is at most the bucket over (lessees x k)
--
-- Returns {verdict (0 admitted, 1 refused for requests), granted (the
-- needed request included), wait_us, requests remaining after the grant,
-- requests reset_us, token balance ("" = no limit), spend ("" = no budget)}.
assert(#KEYS == 4, 'ADMIT takes 4 keys')
assert(#ARGV == 9, 'ADMIT takes 9 arguments')
local rpm, burst, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local need, want, k = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local tokens = ''
if tpm > 0 then tokens = string.format('%.3f', balance(KEYS[2], tpm)) end
local spent = ''
if ARGV[6] == '1' then spent = redis.call('GET', KEYS[4]) or '0' end
if rpm == 0 then return {0, 0, 0, 0, 0, tokens, spent} end
local tat, period, held = bucket(KEYS[1], rpm, burst)
local n = lessees(KEYS[3], ARGV[4], tonumber(ARGV[5]))
local granted = math.min(want, share(held, n, k), held)
if granted < need then
  local allow_at = tat + need * period - burst * period
  return {1, 0, math.ceil(allow_at - now), 0, math.ceil(tat - now), tokens, spent}
end
if granted > 0 then tat = take(KEYS[1], tat, period, granted) end
return {0, granted, 0, held - granted, math.ceil(tat - now), tokens, spent}
