"""The Lua scripts of the Redis run store (``redis.py``): each one atomic step over a run's
keys, and its fleet's where it has one. Key layout: ``redis.py``'s docstring."""

__all__ = [
    "ADMIT",
    "ANSWER",
    "CLAIM",
    "EXPIRE",
    "MOVE",
    "OPEN",
    "OPEN_FLEET",
    "RELEASE",
    "RESERVE",
    "TAKE",
    "TAKE_DUE",
    "UNCLAIM",
    "UNMOVE",
]

OPEN = """
local latest = tonumber(redis.call('HGET', KEYS[2], ARGV[6]) or '0')
if tonumber(ARGV[7]) > latest then redis.call('HSET', KEYS[2], ARGV[6], ARGV[7]) end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[12] == '1' then
  local cap = tonumber(redis.call('HGET', KEYS[3], 'runs') or '0')
  if cap > 0 then
    -- a run past its expiry frees its own slot
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[13])
    if ARGV[15] ~= '1' and redis.call('ZCARD', KEYS[4]) >= cap then return -2 end
    redis.call('ZADD', KEYS[4], ARGV[14], ARGV[16])
  end
end
redis.call('HSET', KEYS[1], 'step', ARGV[1], 'completed', '[]', 'outcome', '',
  'l1', ARGV[2], 'l2', ARGV[3], 'l3', ARGV[4], 'l4', ARGV[5],
  's1', 0, 's2', 0, 's3', 0, 's4', 0, 'r1', 0, 'r2', 0, 'r3', 0, 'r4', 0,
  'grant', ARGV[8], 'key', ARGV[9], 'narrower', ARGV[10], 'fleet', ARGV[11])
return 1
"""

OPEN_FLEET = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'l1', ARGV[1], 'l2', ARGV[2], 'l3', ARGV[3], 'l4', ARGV[4],
    's1', 0, 's2', 0, 's3', 0, 's4', 0, 'r1', 0, 'r2', 0, 'r3', 0, 'r4', 0, 'runs', ARGV[5])
end
return 1
"""

# Undo a step change whose decision was never given, if the run is still where it left it.
UNMOVE = """
local cur = redis.call('HMGET', KEYS[1], 'step', 'outcome', 'completed')
if not cur[1] or cur[1] ~= ARGV[2] or cur[2] ~= '' then return 0 end
local done = cjson.decode(cur[3])
if #done == 0 or done[#done] ~= ARGV[1] then return 0 end
table.remove(done)
redis.call('HSET', KEYS[1], 'step', ARGV[1], 'completed', cjson.encode(done))
return 1
"""

MOVE = """
local cur = redis.call('HMGET', KEYS[1], 'step', 'outcome', 'completed')
if not cur[1] then return -1 end
if cur[1] ~= ARGV[1] or cur[2] ~= '' then return 0 end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'outcome', ARGV[3])
  local fleet = redis.call('HGET', KEYS[1], 'fleet')
  if fleet and fleet ~= '' then redis.call('ZREM', ARGV[4] .. '{' .. fleet .. '}:live', ARGV[5]) end
else
  local done = cjson.decode(cur[3])
  table.insert(done, cur[1])
  redis.call('HSET', KEYS[1], 'step', ARGV[2], 'completed', cjson.encode(done))
end
return 1
"""

# Budgets are compared as Lua numbers (exact below 2^53) but always added as the
# decimal strings they came in as: Lua would print a large number as 1e+15.
RESERVE = """
local b = redis.call('HMGET', KEYS[1], 'l1', 'l2', 'l3', 'l4', 's1', 's2', 's3', 's4',
  'r1', 'r2', 'r3', 'r4', 'fleet', 'outcome')
if not b[1] then return -1 end
-- Ended while this decision was made: it holds nothing (the release would not find it).
if b[14] and b[14] ~= '' and ARGV[10] ~= '1' then return -3 end
local function fits(books)
  for i = 1, 4 do
    local left = tonumber(books[i]) - tonumber(books[i + 4]) - tonumber(books[i + 8])
    -- usd_micros is only known after the call: an exhausted money budget refuses.
    if tonumber(ARGV[i + 1]) > left or (i == 2 and left <= 0) then return 0 end
  end
  return 1
end
local ok = fits(b)
local fleet = false
if b[13] and b[13] ~= '' then
  fleet = ARGV[9] .. '{' .. b[13] .. '}:fleet'
  local f = redis.call('HMGET', fleet, 'l1', 'l2', 'l3', 'l4', 's1', 's2', 's3', 's4',
    'r1', 'r2', 'r3', 'r4')
  if f[1] then ok = math.min(ok, fits(f)) else fleet = false end
end
if ok == 0 and ARGV[8] ~= '1' then return 0 end
for i = 1, 4 do
  if ARGV[i + 1] ~= '0' then
    redis.call('HINCRBY', KEYS[1], 'r' .. i, ARGV[i + 1])
    if fleet then redis.call('HINCRBY', fleet, 'r' .. i, ARGV[i + 1]) end
  end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ',' .. ARGV[3] .. ',' .. ARGV[4] .. ',' .. ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[7])
return ok
"""

# Take a reservation off the books; with 'settle', charge the real tokens and money and
# the reserved tool calls and requests; with 'release', charge nothing. The charge comes
# first: a script that fails midway keeps what it wrote, and a failed charge writes nothing.
TAKE = """
local run_id = redis.call('HGET', KEYS[1], ARGV[1])
if not run_id then return false end
local base = ARGV[5] .. '{' .. run_id .. '}:'
local held = redis.call('HGET', base .. 'rsv', ARGV[1])
if not held then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return false
end
local cost = {}
for v in string.gmatch(held, '[^,]+') do table.insert(cost, v) end
local charge = {ARGV[2], ARGV[3], cost[3], cost[4]}
local books = {base .. 'run'}
local fleet = redis.call('HGET', base .. 'run', 'fleet')
-- A released grant's fleet books are gone: never made again by a late settlement.
local fleet_key = fleet and fleet ~= '' and (ARGV[5] .. '{' .. fleet .. '}:fleet')
if fleet_key and redis.call('EXISTS', fleet_key) == 1 then table.insert(books, fleet_key) end
for _, key in ipairs(books) do
  for i = 1, 4 do
    if ARGV[4] == 'settle' and charge[i] ~= '0' then
      redis.call('HINCRBY', key, 's' .. i, charge[i])
    end
  end
end
for _, key in ipairs(books) do
  for i = 1, 4 do
    if cost[i] ~= '0' then redis.call('HINCRBY', key, 'r' .. i, '-' .. cost[i]) end
  end
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', base .. 'rsv', ARGV[1])
redis.call('ZREM', base .. 'exp', ARGV[1])
return run_id
"""

EXPIRE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1])
local out = {}
local books = {KEYS[1]}
local fleet = redis.call('HGET', KEYS[1], 'fleet')
local fleet_key = fleet and fleet ~= '' and (ARGV[2] .. '{' .. fleet .. '}:fleet')
if fleet_key and redis.call('EXISTS', fleet_key) == 1 then table.insert(books, fleet_key) end
for _, rid in ipairs(due) do
  local held = redis.call('HGET', KEYS[2], rid)
  redis.call('HDEL', KEYS[2], rid)
  redis.call('ZREM', KEYS[3], rid)
  redis.call('HDEL', KEYS[4], rid)
  if held then
    local i = 0
    for v in string.gmatch(held, '[^,]+') do
      i = i + 1
      if v ~= '0' then
        for _, key in ipairs(books) do
          redis.call('HINCRBY', key, 'r' .. i, '-' .. v)
          redis.call('HINCRBY', key, 's' .. i, v)
        end
      end
    end
    table.insert(out, rid)
    table.insert(out, held)
  end
end
return out
"""

# Mark a request id in flight until a deadline (Redis's clock, shared by replicas); a
# replica that died mid-decision leaves a mark that another may take over once it passed.
CLAIM = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and (string.sub(cur, 1, 1) ~= '~' or tonumber(string.sub(cur, 2)) > now_ms) then
  return cur
end
redis.call('HSET', KEYS[1], ARGV[1], '~' .. (now_ms + tonumber(ARGV[2])))
-- '!': claimed over a mark that lapsed unanswered (its decider stuck or gone)
if cur then return '!' end
return false
"""

# Only an in-flight mark is dropped, never an answer.
UNCLAIM = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and string.sub(cur, 1, 1) == '~' then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"""

# Keep the answer, and only the newest ARGV[3] answers of the run.
ANSWER = """
-- a run released while deciding keeps nothing (no stray keys of a run that is gone)
if redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[1])
while redis.call('LLEN', KEYS[2]) > tonumber(ARGV[3]) do
  local oldest = redis.call('LPOP', KEYS[2])
  local cur = redis.call('HGET', KEYS[1], oldest)
  if cur and string.sub(cur, 1, 1) ~= '~' then redis.call('HDEL', KEYS[1], oldest) end
end
return 1
"""

# Drop an ended run's keys (its reservations were settled first; any left are taken off
# its fleet's books), and remember it among the last ARGV[4] released. A grant's default
# run takes its fleet books and envelope with it (its runs were released first; one
# released late elsewhere finds no books to take off).
RELEASE = """
redis.call('ZREM', ARGV[3] .. 'due', ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local fleet = redis.call('HGET', KEYS[1], 'fleet')
if fleet and fleet ~= '' and fleet ~= ARGV[1] then
  local base = ARGV[3] .. '{' .. fleet .. '}:'
  redis.call('ZREM', base .. 'live', ARGV[1])
  if redis.call('EXISTS', base .. 'fleet') == 1 then
    local r = redis.call('HMGET', KEYS[1], 'r1', 'r2', 'r3', 'r4')
    for i = 1, 4 do
      if r[i] ~= '0' then redis.call('HINCRBY', base .. 'fleet', 'r' .. i, '-' .. r[i]) end
    end
  end
end
for _, rid in ipairs(redis.call('HKEYS', KEYS[2])) do redis.call('HDEL', KEYS[6], rid) end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
local own = ARGV[3] .. '{' .. ARGV[1] .. '}:'
redis.call('DEL', own .. 'fleet', own .. 'live')
redis.call('HDEL', ARGV[3] .. 'envelopes', ARGV[1])
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[7], ARGV[1], ARGV[2])
  redis.call('RPUSH', KEYS[8], ARGV[1])
  while redis.call('LLEN', KEYS[8]) > tonumber(ARGV[4]) do
    redis.call('HDEL', KEYS[7], redis.call('LPOP', KEYS[8]))
  end
end
return 1
"""

ADMIT = """
local mark = redis.call('HGET', KEYS[1], ARGV[1])
if mark then
  local sep = string.find(mark, ' ')
  local version = tonumber(string.sub(mark, 1, sep - 1))
  local digest = string.sub(mark, sep + 1)
  local asked = tonumber(ARGV[2])
  if asked < version or (asked == version and digest ~= ARGV[3]) then return version end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
return -1
"""

# Take up to ARGV[2] runs whose release time (ms) came by ARGV[1]: each goes to one caller,
# leased until ARGV[3] (RELEASE removes it; a caller that fails or dies leaves it to be taken
# again then).
TAKE_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[3], id) end
return ids
"""
