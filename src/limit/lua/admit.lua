-- ADMIT: a request that this replica could not decide from its share (none
-- left, no spare concurrency slot, or its view of the token balance and
-- spend too old). Takes the request and a new share of the request bucket,
-- for a capped tenant a slot and a few spare ones, and reads the token
-- balance and the spend, in one round trip.
--
-- KEYS[1] request bucket (GCRA: the theoretical arrival time)
-- KEYS[2] token bucket (hash: b = balance, t = when)
-- KEYS[3] lessees (replica -> share lease end, Unix us)
-- KEYS[4] spend of the current period (the token bucket again without a budget)
-- KEYS[5] concurrency hash (per replica counts and versions; see prelude)
-- KEYS[6] live set (replica -> lease end, Unix us)
-- ARGV[1] requests_per_minute   ARGV[2] request_burst
-- ARGV[3] tokens_per_minute     ARGV[4] replica
-- ARGV[5] lessee ttl_ms         ARGV[6] budgeted ("1" / "0")
-- ARGV[7] requests needed now (0 or 1)
-- ARGV[8] requests wanted in all (needed, and a share to spend locally)
-- ARGV[9] k: a share is at most what is free over (lessees x k)
-- ARGV[10] max_concurrent (0: no slot asked)
-- ARGV[11] version of this change of the replica's count
-- ARGV[12] slots needed: the replica's requests in flight, this one included
-- ARGV[13] slots wanted: needed, and spare ones to take locally
-- ARGV[14] the replica's count if this request is refused (what it holds
--          without it, requests still waiting on Redis included)
-- ARGV[15] the replica's live lease ttl_ms
--
-- Returns {verdict (0 admitted, 1 refused for requests, 2 for
-- concurrency), requests granted (the needed one included), wait_us,
-- requests remaining after the grant, requests reset_us, token balance
-- ("" = no limit), spend ("" = no budget), the version of the replica's
-- count below (-1: no slot asked), the replica's count (slots held),
-- spare slots it may keep idle}.
assert(#KEYS == 6, 'ADMIT takes 6 keys')
assert(#ARGV == 15, 'ADMIT takes 15 arguments')
local rpm, burst, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local need, want, k = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local maxc = tonumber(ARGV[10])
local tokens = ''
if tpm > 0 then tokens = string.format('%.3f', balance(KEYS[2], tpm)) end
local spent = ''
if ARGV[6] == '1' then spent = redis.call('GET', KEYS[4]) or '0' end
local tat, period, held, granted = now, 0, 0, 0
if rpm > 0 then
  tat, period, held = bucket(KEYS[1], rpm, burst)
  local n = lessees(KEYS[3], ARGV[4], tonumber(ARGV[5]))
  granted = math.min(want, share(held, n, k), held)
  if granted < need then
    local allow_at = tat + need * period - burst * period
    return {1, 0, math.ceil(allow_at - now), 0, math.ceil(tat - now), tokens, spent, -1, 0, 0}
  end
end
local slot_version, count, spare = -1, 0, 0
if maxc > 0 and tonumber(ARGV[12]) > 0 then
  local replica, version = ARGV[4], tonumber(ARGV[11])
  local needed, wanted = tonumber(ARGV[12]), tonumber(ARGV[13])
  local dead = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', string.format('%.0f', now))
  for _, r in ipairs(dead) do
    redis.call('HDEL', KEYS[5], r, r .. ':v', r .. ':m', r .. ':b')
    redis.call('ZREM', KEYS[6], r)
  end
  local all = redis.call('HGETALL', KEYS[5])
  local others, here, newest = 0, 0, -1
  local v_field = replica .. ':v'
  for i = 1, #all, 2 do
    local f = all[i]
    if f == v_field then newest = tonumber(all[i + 1])
    elseif f == replica then here = tonumber(all[i + 1])
    elseif not string.find(f, ':', 1, true) then others = others + tonumber(all[i + 1]) end
  end
  local room = maxc - others
  local admitted
  if version > newest then
    if room >= needed then
      -- Spare slots: a share of what is free, as for requests.
      local live = math.max(1, redis.call('ZCARD', KEYS[6]))
      local extra = math.floor((room - needed) / (live * k))
      count = math.min(wanted, needed + extra)
      admitted = true
    else
      count = tonumber(ARGV[14])
      admitted = false
    end
    set_count(KEYS[5], replica, version, count)
    slot_version = version
  else
    -- A newer change of this replica is there: it counts this request.
    count, slot_version = here, newest
    admitted = others + here <= maxc
  end
  if newest < 0 or redis.call('PTTL', KEYS[5]) < 0 then
    alive(KEYS[5], KEYS[6], replica, tonumber(ARGV[15]))
  end
  if not admitted then
    return {2, 0, 1000000, held, math.ceil(tat - now), tokens, spent, slot_version, count, 0}
  end
  spare = math.max(0, count - needed)
end
if granted > 0 then tat = take(KEYS[1], tat, period, granted) end
local reset = 0
if rpm > 0 then reset = math.ceil(tat - now) end
return {0, granted, 0, held - granted, reset, tokens, spent, slot_version, count, spare}
