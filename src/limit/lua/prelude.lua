-- Shared by every limit script (prepended to each): Redis's time, a
-- tenant's token balance, the request bucket, a ledger's charges, and one
-- replica's in-flight count in the concurrency hash. Per replica R the hash holds `R` (the count) and `R:v`
-- (the version of the replica's change it is). Every change a replica
-- sends (an admission, a release, a report) carries its count after the
-- change and a version that only grows on that replica, and is applied
-- only if it is newer than the one applied: a count is absolute, so a
-- change lost or timed out is made good by the next one, and one that
-- arrives late never undoes a newer one.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
-- Sets R's count as of `version`, unless a newer change is there; true
-- if it did.
local function set_count(conc, replica, version, count)
  local newest = tonumber(redis.call('HGET', conc, replica .. ':v') or '') or -1
  if version <= newest then return false end
  redis.call('HSET', conc, replica, count, replica .. ':v', string.format('%.0f', version))
  return true
end
local function alive(conc, live, replica, ttl_ms)
  redis.call('ZADD', live, string.format('%.0f', now + ttl_ms * 1000), replica)
  redis.call('PEXPIRE', conc, ttl_ms * 2)
  redis.call('PEXPIRE', live, ttl_ms * 2)
end
local function balance(tok, tpm)
  local h = redis.call('HMGET', tok, 'b', 't')
  local b, at = tonumber(h[1]), tonumber(h[2])
  if b == nil or at == nil then return tpm end
  return math.min(tpm, b + math.max(0, now - at) * tpm / 60000000)
end
-- The request bucket (GCRA on a theoretical arrival time): the time, the
-- interval between requests (us), and how many whole requests it holds now.
local function bucket(req, rpm, burst)
  local period = 60000000 / rpm
  local tat = tonumber(redis.call('GET', req)) or now
  if tat < now then tat = now end
  return tat, period, math.floor(burst - (tat - now) / period)
end
-- Takes `n` requests from the bucket; returns the new arrival time.
local function take(req, tat, period, n)
  local next_tat = tat + n * period
  redis.call('SET', req, string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1)
  return next_tat
end
-- Applies a ledger's totals (docs/redis.md "Exactly once"): a total adds
-- what lies past the last one applied from that ledger, or past what its
-- replica had confirmed when the ledger is unknown here. `tok` is the token
-- bucket, `spend` the period's spend key, `ledger` the ledger's hash.
local function charge(tok, spend, ledger, tpm, tokens, tokens_confirmed, period, usd,
                      usd_confirmed, spend_expire_at, ledger_ttl)
  local function added(field, total, confirmed)
    local t = tonumber(total)
    local last = tonumber(redis.call('HGET', ledger, field) or '')
    local base = last or tonumber(confirmed)
    if last == nil or t > last then redis.call('HSET', ledger, field, total) end
    if t > base then return t - base end
    return 0
  end
  local used = added('tok', tokens, tokens_confirmed)
  if tpm > 0 and used > 0 then
    local b = math.max(balance(tok, tpm) - used, -tpm * 1440)
    redis.call('HSET', tok, 'b', string.format('%.3f', b), 't', string.format('%.0f', now))
    redis.call('PEXPIRE', tok, math.ceil((tpm - b) * 60000 / tpm) + 1000)
  end
  if period ~= '' then
    local spent = added('usd:' .. period, usd, usd_confirmed)
    if spent > 0 then
      redis.call('INCRBYFLOAT', spend, string.format('%.9f', spent))
      redis.call('PEXPIREAT', spend, spend_expire_at)
    end
  end
  redis.call('PEXPIRE', ledger, ledger_ttl)
end
-- The replicas holding a share of the request bucket, this one renewed:
-- how many there are (at least 1).
local function lessees(set, replica, ttl_ms)
  redis.call('ZREMRANGEBYSCORE', set, '-inf', string.format('%.0f', now))
  redis.call('ZADD', set, string.format('%.0f', now + ttl_ms * 1000), replica)
  redis.call('PEXPIRE', set, ttl_ms * 2)
  return redis.call('ZCARD', set)
end
-- A replica's share: the requests the bucket holds over the lessees and
-- `k`, at least 1, so it shrinks to one request a round trip near the limit.
local function share(held, n, k)
  return math.max(1, math.floor(held / (n * k)))
end
