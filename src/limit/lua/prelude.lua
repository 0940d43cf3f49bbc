-- Shared by ADMIT and SETTLE (prepended to each): Redis's time, a
-- tenant's token balance, and the bookkeeping of one replica's in-flight
-- count in the concurrency hash. Per replica R the hash holds `R` (the
-- count), `R:m` (the newest version of a +1/-1 applied) and `R:b` (the
-- version of the last absolute report). A change is applied only if it is
-- newer than the last absolute report (which already includes it); an
-- absolute report only if no newer change was applied. So the count is
-- exact whatever order reports arrive in.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function marks(conc, replica)
  local v = redis.call('HMGET', conc, replica .. ':b', replica .. ':m')
  return tonumber(v[1]) or -1, tonumber(v[2]) or -1
end
local function change(conc, replica, version, by, base, newest)
  if version <= base then return end
  local n = redis.call('HINCRBY', conc, replica, by)
  if n < 0 then redis.call('HSET', conc, replica, 0) end
  if version > newest then
    redis.call('HSET', conc, replica .. ':m', string.format('%.0f', version))
  end
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
