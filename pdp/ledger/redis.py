"""The shared run store: run state, budgets, answers and rollback marks in Redis.

Several PDP replicas pointed at one Redis share every run: a reservation checks and
holds all four budgets in one Lua script, so no interleaving of replicas overspends;
a step change is a compare-and-set; a request id answered by one replica gets the same
answer from another. Envelopes are kept so a replica that never saw a registration can
load the run, but Redis is not trusted with them: each replica verifies the envelope
with its own trust store before compiling it.

Keys (``P`` is the prefix, ``{R}`` the run id as a hash tag):
``P{R}:run`` hash of step, completed (JSON list), outcome, l1..l4 limits, s1..s4 spent,
r1..r4 reserved (budgets in ``BUDGETS`` order); ``P{R}:rsv`` reservation id -> costs;
``P{R}:exp`` sorted set of reservation ids by expiry (ms); ``P{R}:answers`` request id
-> stored answer, or ``~deadline`` while in flight, and ``P{R}:order`` the answered ids
oldest first (the last ``ANSWER_WINDOW`` are kept); ``Prsvrun`` reservation id -> run
id; ``Penvelopes`` run id -> envelope; ``Plineages`` lineage -> highest version;
``Phighwater`` lineage -> "version digest". Scripts touch keys of several runs, so the
target is one Redis primary, not Redis Cluster.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection
from datetime import datetime
from typing import Any, TypeVar

import redis
from redis.commands.core import Script

from pdp.errors import ManifestRollback, ManifestUnknown, StoreUnavailable
from pdp.ledger.store import ANSWER_WINDOW, Books, RunState, Usage

__all__ = ["RedisRunStore"]

T = TypeVar("T")

_OPEN = """
local created = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'step', ARGV[1], 'completed', '[]', 'outcome', '',
    'l1', ARGV[2], 'l2', ARGV[3], 'l3', ARGV[4], 'l4', ARGV[5],
    's1', 0, 's2', 0, 's3', 0, 's4', 0, 'r1', 0, 'r2', 0, 'r3', 0, 'r4', 0,
    'grant', ARGV[8], 'key', ARGV[9])
  created = 1
end
local latest = tonumber(redis.call('HGET', KEYS[2], ARGV[6]) or '0')
if tonumber(ARGV[7]) > latest then redis.call('HSET', KEYS[2], ARGV[6], ARGV[7]) end
return created
"""

_MOVE = """
local cur = redis.call('HMGET', KEYS[1], 'step', 'outcome', 'completed')
if not cur[1] then return -1 end
if cur[1] ~= ARGV[1] or cur[2] ~= '' then return 0 end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'outcome', ARGV[3])
else
  local done = cjson.decode(cur[3])
  table.insert(done, cur[1])
  redis.call('HSET', KEYS[1], 'step', ARGV[2], 'completed', cjson.encode(done))
end
return 1
"""

# Budgets are compared as Lua numbers (exact below 2^53) but always added as the
# decimal strings they came in as: Lua would print a large number as 1e+15.
_RESERVE = """
local b = redis.call('HMGET', KEYS[1], 'l1', 'l2', 'l3', 'l4', 's1', 's2', 's3', 's4',
  'r1', 'r2', 'r3', 'r4')
if not b[1] then return -1 end
local fits = 1
for i = 1, 4 do
  local left = tonumber(b[i]) - tonumber(b[i + 4]) - tonumber(b[i + 8])
  -- usd_micros is only known after the call: an exhausted money budget refuses.
  if tonumber(ARGV[i + 1]) > left or (i == 2 and left <= 0) then fits = 0 end
end
if fits == 0 and ARGV[8] ~= '1' then return 0 end
for i = 1, 4 do
  if ARGV[i + 1] ~= '0' then redis.call('HINCRBY', KEYS[1], 'r' .. i, ARGV[i + 1]) end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ',' .. ARGV[3] .. ',' .. ARGV[4] .. ',' .. ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[7])
return fits
"""

# Take a reservation off the books; with 'settle', charge the real tokens and money and
# the reserved tool calls and requests; with 'release', charge nothing. The charge comes
# first: a script that fails midway keeps what it wrote, and a failed charge writes nothing.
_TAKE = """
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
for i = 1, 4 do
  if ARGV[4] == 'settle' and charge[i] ~= '0' then
    redis.call('HINCRBY', base .. 'run', 's' .. i, charge[i])
  end
end
for i = 1, 4 do
  if cost[i] ~= '0' then redis.call('HINCRBY', base .. 'run', 'r' .. i, '-' .. cost[i]) end
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', base .. 'rsv', ARGV[1])
redis.call('ZREM', base .. 'exp', ARGV[1])
return run_id
"""

_EXPIRE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1])
local out = {}
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
        redis.call('HINCRBY', KEYS[1], 'r' .. i, '-' .. v)
        redis.call('HINCRBY', KEYS[1], 's' .. i, v)
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
_CLAIM = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and (string.sub(cur, 1, 1) ~= '~' or tonumber(string.sub(cur, 2)) > now_ms) then
  return cur
end
redis.call('HSET', KEYS[1], ARGV[1], '~' .. (now_ms + tonumber(ARGV[2])))
return false
"""

# Only an in-flight mark is dropped, never an answer.
_UNCLAIM = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and string.sub(cur, 1, 1) == '~' then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"""

# Keep the answer, and only the newest ARGV[3] answers of the run.
_ANSWER = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[1])
while redis.call('LLEN', KEYS[2]) > tonumber(ARGV[3]) do
  local oldest = redis.call('LPOP', KEYS[2])
  local cur = redis.call('HGET', KEYS[1], oldest)
  if cur and string.sub(cur, 1, 1) ~= '~' then redis.call('HDEL', KEYS[1], oldest) end
end
return 1
"""

_ADMIT = """
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

_IN_FLIGHT_MS = 10_000
_FIELDS = [f"{kind}{i}" for kind in "lsr" for i in range(1, 5)]


def _guarded(call: Callable[[], T]) -> T:
    try:
        return call()
    except redis.RedisError as exc:
        raise StoreUnavailable(f"run store unreachable: {type(exc).__name__}") from exc


def _usage(values: list[Any]) -> Usage:
    return Usage(*(int(v) for v in values))


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


class RedisRunStore:
    shared = True

    def __init__(self, url: str, prefix: str = "abc:", timeout: float = 2.0) -> None:
        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._prefix = prefix
        scripts = (_OPEN, _MOVE, _RESERVE, _TAKE, _EXPIRE, _CLAIM, _UNCLAIM, _ANSWER, _ADMIT)
        (
            self._open,
            self._move,
            self._reserve,
            self._take,
            self._expire,
            self._claim,
            self._unclaim,
            self._answer,
            self._admit,
        ) = (self._redis.register_script(source) for source in scripts)

    def ping(self) -> None:
        """Reach Redis now, so a wrong URL stops start-up instead of refusing later."""
        _guarded(self._redis.ping)

    def _key(self, run_id: str, part: str) -> str:
        return f"{self._prefix}{{{run_id}}}:{part}"

    def _call(self, script: Script, run_id: str, keys: list[str], args: list[Any]) -> Any:
        result = _guarded(lambda: script(keys=keys, args=args))
        if result == -1:
            raise ManifestUnknown("no run with this id")
        return result

    def open(
        self,
        run_id: str,
        first_step: str,
        limits: Usage,
        lineage: str,
        version: int,
        grant: tuple[str, str] = ("", ""),
    ) -> bool:
        keys = [self._key(run_id, "run"), self._prefix + "lineages"]
        args = [first_step, *limits.as_list(), lineage, version, *grant]
        return bool(self._call(self._open, run_id, keys, args))

    def grant_of(self, run_id: str) -> tuple[str, str] | None:
        key = self._key(run_id, "run")
        values = _guarded(lambda: self._redis.hmget(key, ["grant", "key"]))
        grant_run, run_key = (v.decode() if isinstance(v, bytes) else "" for v in values)
        return (grant_run, run_key) if grant_run and run_key else None

    def state(self, run_id: str, lineage: str) -> RunState:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hmget(self._key(run_id, "run"), ["step", "completed", "outcome"])
        pipe.hget(self._prefix + "lineages", lineage)
        (step, completed, outcome), latest = _guarded(pipe.execute)
        if step is None:
            raise ManifestUnknown("no run with this id")
        return RunState(
            step.decode(),
            tuple(json.loads(completed)),
            outcome.decode(),
            int(latest or 0),
        )

    def move(self, run_id: str, seen_step: str, step: str, outcome: str = "") -> bool:
        keys = [self._key(run_id, "run")]
        return bool(self._call(self._move, run_id, keys, [seen_step, step, outcome]))

    def reserve(
        self, run_id: str, reservation_id: str, cost: Usage, expires: datetime, force: bool = False
    ) -> bool:
        keys = [
            self._key(run_id, "run"),
            self._key(run_id, "rsv"),
            self._key(run_id, "exp"),
            self._prefix + "rsvrun",
        ]
        args = [reservation_id, *cost.as_list(), _ms(expires), run_id, int(force)]
        return bool(self._call(self._reserve, run_id, keys, args))

    def _take_off(self, reservation_id: str, tokens: int, usd_micros: int, mode: str) -> Any:
        keys = [self._prefix + "rsvrun"]
        args: list[str | int] = [reservation_id, tokens, usd_micros, mode, self._prefix]
        return _guarded(lambda: self._take(keys=keys, args=args))

    def release(self, reservation_id: str) -> None:
        self._take_off(reservation_id, 0, 0, "release")

    def settle(self, reservation_id: str, tokens: int, usd_micros: int) -> str | None:
        run_id = self._take_off(reservation_id, tokens, usd_micros, "settle")
        return run_id.decode() if run_id else None

    def expire(self, run_id: str, now: datetime) -> list[tuple[str, Usage]]:
        keys = [
            self._key(run_id, "run"),
            self._key(run_id, "rsv"),
            self._key(run_id, "exp"),
            self._prefix + "rsvrun",
        ]
        flat = _guarded(lambda: self._expire(keys=keys, args=[_ms(now)]))
        return [
            (flat[i].decode(), _usage(flat[i + 1].decode().split(",")))
            for i in range(0, len(flat), 2)
        ]

    def books(self, run_id: str) -> Books:
        values = _guarded(lambda: self._redis.hmget(self._key(run_id, "run"), _FIELDS))
        if values[0] is None:
            raise ManifestUnknown("no run with this id")
        return Books(_usage(values[0:4]), _usage(values[4:8]), _usage(values[8:12]))

    def claim(self, run_id: str, request_id: str) -> dict[str, Any] | None:
        key = self._key(run_id, "answers")
        deadline = time.monotonic() + _IN_FLIGHT_MS / 1000
        while True:
            prior = _guarded(lambda: self._claim(keys=[key], args=[request_id, _IN_FLIGHT_MS]))
            if prior is None:
                return None
            if not prior.startswith(b"~"):
                answer: dict[str, Any] = json.loads(prior)
                return answer
            if time.monotonic() > deadline:
                return None  # the mark outlived its deadline's clock skew: decide anew
            time.sleep(0.005)  # another replica is deciding this request id right now

    def answer(self, run_id: str, request_id: str, stored: dict[str, Any]) -> None:
        keys = [self._key(run_id, "answers"), self._key(run_id, "order")]
        args: list[str | int] = [request_id, json.dumps(stored), ANSWER_WINDOW]
        _guarded(lambda: self._answer(keys=keys, args=args))

    def unclaim(self, run_id: str, request_id: str) -> None:
        keys = [self._key(run_id, "answers")]
        _guarded(lambda: self._unclaim(keys=keys, args=[request_id]))

    def put_envelope(self, run_id: str, envelope: bytes) -> None:
        _guarded(lambda: self._redis.hset(self._prefix + "envelopes", run_id, envelope))

    def envelope(self, run_id: str) -> bytes | None:
        raw = _guarded(lambda: self._redis.hget(self._prefix + "envelopes", run_id))
        return raw if isinstance(raw, bytes) else None

    def admit(self, lineage: str, version: int, manifest_digest: str) -> None:
        """Rollback marks shared by the replicas: this store is their ``HighWater`` too."""
        keys = [self._prefix + "highwater"]
        args: list[str | int] = [lineage, version, manifest_digest]
        mark = _guarded(lambda: self._admit(keys=keys, args=args))
        if mark != -1:
            raise ManifestRollback(
                f"lineage {lineage!r} version {version} is not above accepted version {mark}"
            )

    def export_state(self) -> dict[str, Any]:
        """Nothing: Redis is the record of steps, budgets, reservations and answers, shared
        by every replica; a snapshot holds only the runs this process compiled."""
        return {}

    def import_state(self, state: dict[str, Any], run_ids: Collection[str]) -> None:
        """Nothing to put back: see ``export_state``."""

    def close(self) -> None:
        self._redis.close()
