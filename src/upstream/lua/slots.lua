-- SLOTS: one holder's share of an upstream's max_concurrent, counted for
-- the fleet (docs/redis.md, "An upstream's concurrency"). A holder is one
-- replica's gate of that upstream; the hash holds, per holder H:
--
--   H    "<slots held> <version> <lease end, Unix ms>"
--   H:w  "<waiting since, Unix ms> <slots wanted> <end, Unix ms>", while
--        H has requests waiting that its slots do not cover
--
-- Every call states the slots its holder has (absolute, so a change lost
-- or timed out is made good by the next one) with a version that only
-- grows; one older than the newest applied changes nothing. It renews the
-- holder's lease; a holder whose lease lapsed (it died) is dropped, with
-- its slots. It grants up to ARGV[4] more slots out of what the other
-- holders leave free, after the wants of the holders that have waited
-- longer: a holder whose requests were served (by Redis, or by its own
-- slots going from one request to the next) goes to the back of the line,
-- so a free slot goes round the waiting replicas in turn.
--
-- KEYS[1] the upstream's slot hash
-- ARGV[1] holder                 ARGV[2] version of this change
-- ARGV[3] slots it holds now     ARGV[4] more it wants (0: a report)
-- ARGV[5] max_concurrent         ARGV[6] lease ttl_ms
-- ARGV[7] how long a want lasts unless asked again (ms)
-- ARGV[8] "1" if the holder's requests were served since its last call
--
-- Returns {slots granted, other holders waiting, 1 if applied (0: older
-- than a change applied)}.
assert(#KEYS == 1, 'SLOTS takes 1 key')
assert(#ARGV == 8, 'SLOTS takes 8 arguments')
local key, me = KEYS[1], ARGV[1]
local version, have, want = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local cap, ttl, want_ttl = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local held, waits = {}, {}
local all = redis.call('HGETALL', key)
for i = 1, #all, 2 do
  local f, v = all[i], all[i + 1]
  local a, b, c = string.match(v, '^(%d+) (%d+) (%d+)$')
  local live = c ~= nil and tonumber(c) > now
  local h = string.match(f, '^(.*):w$')
  if not live then
    redis.call('HDEL', key, f)
  elseif h then
    waits[h] = {tonumber(a), tonumber(b)}
  else
    held[f] = {tonumber(a), tonumber(b)}
  end
end

local others, waiting, ahead = 0, 0, 0
for h, s in pairs(held) do
  if h ~= me then others = others + s[1] end
end
-- Served (or new in the line): behind everyone waiting already.
local served = ARGV[8] == '1' or not waits[me]
local since = now
if not served then since = waits[me][1] end
for h, w in pairs(waits) do
  if h ~= me then
    waiting = waiting + 1
    if w[1] < since or (w[1] == since and (served or h < me)) then ahead = ahead + w[2] end
  end
end

if held[me] and version <= held[me][2] then
  return {0, waiting, 0}
end

local granted = math.max(0, math.min(want, cap - others - have - ahead))
redis.call('HSET', key, me, string.format('%.0f %.0f %.0f', have + granted, version, now + ttl))
if want > granted then
  if granted > 0 then since = now end
  redis.call('HSET', key, me .. ':w',
    string.format('%.0f %.0f %.0f', since, want - granted, now + want_ttl))
else
  redis.call('HDEL', key, me .. ':w')
end
-- The key lives as long as the longest lease in it.
if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
return {granted, waiting, 1}
