"""The Lua scripts of the Redis warm tier. Each one is a single atomic step on one session.

Every script is called with the same four keys, all in the session's hash slot (so they run
unchanged on Redis Cluster):

    KEYS[1] meta   hash: seq (last assigned), first (oldest seq this copy holds completely
                   from), ver (version), deleted (tombstone flag)
    KEYS[2] turns  sorted set: member "<byte length of turn id>:<turn id><encoded record>",
                   score = seq
    KEYS[3] ids    hash: turn id -> seq (idempotency, and the duplicate's seq)
    KEYS[4] docs   hash: document name -> bytes

Writing scripts share ARGV[1] = invalidation channel ('' = the caller publishes, as on a
cluster), ARGV[2] = session key (the message), ARGV[3] = TTL in seconds; their own arguments
follow from ARGV[4].

`meta` decides whether a session exists: leftovers of the other keys without it (evicted
under memory pressure, or expired a moment apart) are dropped, never trusted.
"""

from __future__ import annotations

_PRELUDE = """
local meta, turns, ids, docs = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local channel, session, ttl = ARGV[1], ARGV[2], ARGV[3]

-- A session created (again) gets a version no earlier incarnation can have had: the server
-- clock in microseconds. A replica caching an expired incarnation's version 5 must never see
-- a 5 again. '%.0f' keeps all digits; tostring() would print 1.7e+15.
local function fresh_version()
  local now = redis.call('TIME')
  return string.format('%.0f', tonumber(now[1]) * 1000000 + tonumber(now[2]))
end

local function bump_version()
  if redis.call('HEXISTS', meta, 'ver') == 1 then
    return redis.call('HINCRBY', meta, 'ver', 1)
  end
  local version = fresh_version()
  redis.call('HSET', meta, 'ver', version)
  return tonumber(version)
end

local function turn_id_of(member)
  local length, start = string.match(member, '^(%d+):()')
  return string.sub(member, start, start + tonumber(length) - 1)
end

-- Sliding TTL: every write keeps the whole session alive for another `ttl` seconds.
local function slide_ttl()
  redis.call('EXPIRE', meta, ttl)
  redis.call('EXPIRE', turns, ttl)
  redis.call('EXPIRE', ids, ttl)
  redis.call('EXPIRE', docs, ttl)
end

local function notify()
  if channel ~= '' then
    redis.call('PUBLISH', channel, session)
  end
end

-- Keep the newest `max_turns`; the oldest kept turn becomes `first`.
local function trim(max_turns)
  local excess = redis.call('ZCARD', turns) - max_turns
  if excess <= 0 then
    return
  end
  for _, member in ipairs(redis.call('ZRANGE', turns, 0, excess - 1)) do
    redis.call('HDEL', ids, turn_id_of(member))
  end
  redis.call('ZREMRANGEBYRANK', turns, 0, excess - 1)
  local oldest = redis.call('ZRANGE', turns, 0, 0, 'WITHSCORES')
  redis.call('HSET', meta, 'first', oldest[2])
end
"""

# ARGV[4] turn id, [5] member, [6] floor seq or '' (unknown), [7] max turns.
# -> {0, seq, version} stored | {1, seq, 0} duplicate | {2, 0, 0} needs the floor.
APPEND_NEXT = (
    _PRELUDE
    + """
local turn_id, member, floor, max_turns = ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
local last
if redis.call('EXISTS', meta) == 1 then
  local known = redis.call('HGET', ids, turn_id)
  if known then
    return {1, tonumber(known), 0}
  end
  last = tonumber(redis.call('HGET', meta, 'seq') or '0')
  if floor ~= '' and tonumber(floor) > last then
    -- The cold tier is ahead of this copy (it raced with a re-creation): keep only what
    -- follows the cold tier, which holds everything up to `floor`.
    redis.call('DEL', turns, ids)
    last = tonumber(floor)
    redis.call('HSET', meta, 'first', last + 1)
  end
elseif floor == '' then
  return {2, 0, 0}
else
  -- A new warm copy of a session whose older turns (up to `floor`) are in the cold tier only.
  redis.call('DEL', turns, ids)
  last = tonumber(floor)
  redis.call('HSET', meta, 'first', last + 1)
end
local seq = last + 1
redis.call('ZADD', turns, seq, member)
redis.call('HSET', ids, turn_id, seq)
redis.call('HSET', meta, 'seq', seq)
redis.call('HDEL', meta, 'deleted')
trim(max_turns)
local version = bump_version()
slide_ttl()
notify()
return {0, seq, version}
"""
)

# ARGV[4] turn id, [5] member, [6] seq (given by the caller), [7] max turns.
# -> 1 stored | 0 duplicate turn id | -1 seq already used by another turn.
APPEND = (
    _PRELUDE
    + """
local turn_id, member, seq, max_turns = ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
if redis.call('EXISTS', meta) == 1 then
  if redis.call('HEXISTS', ids, turn_id) == 1 then
    return 0
  end
  if #redis.call('ZRANGEBYSCORE', turns, seq, seq, 'LIMIT', 0, 1) > 0 then
    return -1
  end
else
  redis.call('DEL', turns, ids)
  redis.call('HSET', meta, 'seq', 0)
end
if redis.call('ZCARD', turns) == 0 or seq < tonumber(redis.call('HGET', meta, 'first') or '0') then
  redis.call('HSET', meta, 'first', seq)
end
if seq > tonumber(redis.call('HGET', meta, 'seq') or '0') then
  redis.call('HSET', meta, 'seq', seq)
end
redis.call('ZADD', turns, seq, member)
redis.call('HSET', ids, turn_id, seq)
redis.call('HDEL', meta, 'deleted')
trim(max_turns)
bump_version()
slide_ttl()
notify()
return 1
"""
)

# ARGV[4] first seq, [5] last seq, then (seq, turn id, member) per turn, in seq order.
# -> the new version, or false (nil) when the session or its tombstone exists: a refill never
# overwrites a concurrent append and never resurrects a deleted session.
FILL = (
    _PRELUDE
    + """
if redis.call('EXISTS', meta) == 1 then
  return false
end
redis.call('DEL', turns, ids)
for i = 6, #ARGV, 3 do
  redis.call('ZADD', turns, ARGV[i], ARGV[i + 2])
  redis.call('HSET', ids, ARGV[i + 1], ARGV[i])
end
local version = fresh_version()
redis.call('HSET', meta, 'first', ARGV[4], 'seq', ARGV[5], 'ver', version)
slide_ttl()
return tonumber(version)
"""
)

# ARGV[4] keep turns with seq <= this. -> how many turns were dropped.
TRUNCATE_AFTER = (
    _PRELUDE
    + """
local keep = tonumber(ARGV[4])
if redis.call('EXISTS', meta) == 0 then
  return 0
end
local above = '(' .. ARGV[4]
local gone = redis.call('ZRANGEBYSCORE', turns, above, '+inf')
for _, member in ipairs(gone) do
  redis.call('HDEL', ids, turn_id_of(member))
end
redis.call('ZREMRANGEBYSCORE', turns, above, '+inf')
local changed = #gone > 0
if tonumber(redis.call('HGET', meta, 'seq') or '0') > keep then
  -- Rewind: the next appended turn gets keep + 1, as in the cold tier.
  redis.call('HSET', meta, 'seq', keep)
  changed = true
end
if tonumber(redis.call('HGET', meta, 'first') or '0') > keep + 1 then
  redis.call('HSET', meta, 'first', keep + 1)
end
if changed then
  bump_version()
  slide_ttl()
  notify()
end
return #gone
"""
)

# -> the tombstone's version. The tombstone is the meta hash itself: an empty session
# (seq 0, first 1) flagged deleted, with a newer version, kept for one TTL.
DELETE = (
    _PRELUDE
    + """
redis.call('DEL', turns, ids, docs)
redis.call('HSET', meta, 'seq', 0, 'first', 1, 'deleted', 1)
local version = bump_version()
redis.call('EXPIRE', meta, ttl)
notify()
return version
"""
)

# -> 1. Drops the copy without a tombstone: Redis missed writes (it was unreachable), the
# cold tier has them, and the next read must refill from there.
EVICT = (
    _PRELUDE
    + """
redis.call('DEL', meta, turns, ids, docs)
notify()
return 1
"""
)

# ARGV[4] name, [5] data. Documents do not change the version (it versions the turns).
PUT_DOC = (
    _PRELUDE
    + """
redis.call('HSET', docs, ARGV[4], ARGV[5])
slide_ttl()
return 1
"""
)

# ARGV[4..]: name, data, name, data, ... (a commit's documents in one round trip).
PUT_DOCS = (
    _PRELUDE
    + """
redis.call('HSET', docs, unpack(ARGV, 4))
slide_ttl()
return 1
"""
)

# Read-only; KEYS[1] meta, KEYS[2] turns. -> nil when the session is not in Redis, else
# {ver, first, seq, deleted, {member, score, member, score, ...}} read at one instant.
# Used on a cluster only: a single server reads the same two things in a MULTI/EXEC (see
# `RedisBackend.snapshot`), since Lua copies every record in and out (~2 ns a byte).
SNAPSHOT = """
local head = redis.call('HMGET', KEYS[1], 'ver', 'first', 'seq', 'deleted')
if not head[1] then
  return false
end
return {head[1], head[2] or '1', head[3] or '0', head[4] or '0',
        redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')}
"""

# Pending-turn markers (read-your-writes across replicas) live beside a session's keys:
#   <prefix>:{tag}:pending   sorted set: turn id, score = expiry in ms (client clock)
# The scripts below are read-only and touch the session's slot only.

# KEYS[1] pending, KEYS[2] meta; ARGV[1] now in ms, ARGV[2..] turn ids not to count (markers
# the caller no longer waits for). -> {unexpired markers not excluded, version or ''}: the
# two checks of a rewrite's read, in one round trip and at one instant (a marker removed
# before this ran was removed after its turn was written, so the version includes that turn).
PENDING_AND_VERSION = """
local now = tonumber(ARGV[1])
local count = redis.call('ZCOUNT', KEYS[1], now, '+inf')
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) >= now then
    count = count - 1
  end
end
return {count, redis.call('HGET', KEYS[2], 'ver') or ''}
"""

# KEYS[1] pending, KEYS[2] ids; ARGV[1] now in ms, ARGV[2..] turn ids. -> 1 or 0 per turn id:
# 1 when the turn is settled (stored in the session, or its marker gone or expired), which
# tells the replica that began it that another replica captured its reply.
PENDING_SETTLED = """
local now = tonumber(ARGV[1])
local settled = {}
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 1 or not score or tonumber(score) < now then
    settled[#settled + 1] = 1
  else
    settled[#settled + 1] = 0
  end
end
return settled
"""
