-- Shared by ADMIT and SETTLE (prepended to each): Redis's time, a
-- tenant's token balance, and one replica's in-flight count in the
-- concurrency hash. Per replica R the hash holds `R` (the count) and `R:v`
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
