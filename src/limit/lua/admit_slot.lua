-- ADMIT_SLOT: decides one request of a tenant with a concurrency cap for
-- the fleet, in one round trip (its slot is counted per request).
--
-- KEYS[1] request bucket (GCRA: the theoretical arrival time)
-- KEYS[2] token bucket (hash: b = balance, t = when)
-- KEYS[3] concurrency hash (per replica counts and versions)
-- KEYS[4] live set (replica -> lease end, Unix us)
-- KEYS[5] spend of the current period (the token bucket again without a budget)
-- ARGV[1] requests_per_minute   ARGV[2] request_burst
-- ARGV[3] tokens_per_minute     ARGV[4] max_concurrent
-- ARGV[5] replica               ARGV[6] version of this change
-- ARGV[7] lease ttl_ms          ARGV[8] budgeted ("1" / "0")
-- ARGV[9] this replica's count of the tenant's requests in flight, this
--         one included (as of ARGV[6])
--
-- Returns {verdict (0 admitted, 1 requests, 2 concurrency), wait_us,
-- requests remaining, requests reset_us, token balance ("" = no limit),
-- spend ("" = no budget)}.
assert(#KEYS == 5, 'ADMIT_SLOT takes 5 keys')
assert(#ARGV == 9, 'ADMIT_SLOT takes 9 arguments')
local rpm, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tpm, maxc = tonumber(ARGV[3]), tonumber(ARGV[4])
local tokens = ''
if tpm > 0 then tokens = string.format('%.3f', balance(KEYS[2], tpm)) end
local spent = ''
if ARGV[8] == '1' then spent = redis.call('GET', KEYS[5]) or '0' end
local remaining, reset = 0, 0
if rpm > 0 then
  local period = 60000000 / rpm
  local tat = tonumber(redis.call('GET', KEYS[1])) or now
  if tat < now then tat = now end
  local next_tat = tat + period
  local allow_at = next_tat - burst * period
  if now < allow_at then
    return {1, math.ceil(allow_at - now), 0, math.ceil(tat - now), tokens, spent}
  end
  redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1)
  remaining = math.floor((now - allow_at) / period)
  reset = math.ceil(next_tat - now)
end
if maxc > 0 then
  local replica, version, mine = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[9])
  local dead = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', string.format('%.0f', now))
  for _, r in ipairs(dead) do
    redis.call('HDEL', KEYS[3], r, r .. ':v', r .. ':m', r .. ':b')
    redis.call('ZREM', KEYS[4], r)
  end
  -- One read gives every replica's count and this replica's version.
  local all = redis.call('HGETALL', KEYS[3])
  local others, here, newest = 0, 0, -1
  local v_field = replica .. ':v'
  for i = 1, #all, 2 do
    local f = all[i]
    if f == v_field then newest = tonumber(all[i + 1])
    elseif f == replica then here = tonumber(all[i + 1])
    elseif not string.find(f, ':', 1, true) then others = others + tonumber(all[i + 1]) end
  end
  -- A newer change of this replica is there already (it counts this
  -- request); else this admission's count is the replica's.
  local fresh = version > newest
  if fresh then here = mine end
  if others + here > maxc then
    -- Refused: the replica's count without this request.
    if fresh then set_count(KEYS[3], replica, version, mine - 1) end
    return {2, 1000000, remaining, reset, tokens, spent}
  end
  if fresh then set_count(KEYS[3], replica, version, mine) end
  -- A replica Redis has not heard from (new, or Redis restarted empty)
  -- registers its lease here; renewal keeps it.
  if newest < 0 or redis.call('PTTL', KEYS[3]) < 0 then
    alive(KEYS[3], KEYS[4], replica, tonumber(ARGV[7]))
  end
end
return {0, 0, remaining, reset, tokens, spent}
