"""Generated actions around two manifests, and OPA's engine deciding them as the reference.

The differential test (tests/integration/test_engine_reference.py) sends each action to a
real abc-pdp over gRPC and has OPA's own Go engine decide the same action, as the agent
sent it, with the same policy and data; ``make bench`` (tests/bench/bench_engine.py) runs
the same cases through regopy to count where it differs.

Actions are drawn from a seeded generator: every constraint type, non-ASCII and control
characters (NUL included), backslashes, path tricks, step orders, probes. Values the
engine cannot hold exactly (a lone surrogate, an integer at or beyond 2^53) and HTTP paths
the mapping refuses (``check_http_path``: not printable ASCII, or escapes an upstream could
decode to another path) are marked ``unrepresentable``: the PDP must refuse those before
evaluation, as ``bad_request``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from opa_bindings import OpaEngine

from pdp.api.reasons import MappingError
from pdp.api.requests import check_http_path

__all__ = ["DEMO_BUDGETS", "WIDE_INTENT", "Case", "Reference", "cases", "with_version"]

# Budgets no generated run can exhaust: the differential test compares the policy, not the
# ledger (the budget tests do that).
DEMO_BUDGETS = """budgets:
  tokens: 1000000000
  usd_micros: 1000000000
  tool_calls: 1000000000
  requests: 1000000000
"""

WIDE_INTENT = (
    """apiVersion: abc/v1
kind: RunIntent
tenant: acme
agent: wide-bot
lineage: acme/wide-bot
version: 1
goal: Every constraint type, several hosts and a four-step plan.
lifetime: 8h
models:
  - {provider: openai, model: gpt-4o-mini, max_tokens_per_call: 2048}
  - {provider: anthropic, model: claude-haiku-4-5, max_tokens_per_call: 1024}
tools:
  - server: kb
    name: search
    args:
      query: {type: string, required: true, minLength: 2, maxLength: 12}
      top_k: {type: integer, minimum: 1, maximum: 20}
      lang: {type: string, enum: [en, fr, "é"]}
      score: {type: number, minimum: 0, maximum: 1}
  - server: kb
    name: fetch_article
    args:
      article_id: {type: string, required: true, pattern: "^KB-[0-9]{1,8}$"}
  - server: files
    name: read
    args:
      path: {type: string, pattern: "^[^/]{1,4}$"}
      name: {type: string, pattern: "(?i)^ok.$"}
      word: {type: string, pattern: "^\\\\w+$"}
      flags: {type: array}
      opts: {type: object}
      dry: {type: boolean}
      nothing: {type: "null"}
      count: {type: integer}
      level: {type: integer, enum: [1, 2, 3]}
http:
  - {host: billing.internal, methods: [GET, HEAD], path_prefix: /v1/invoices/}
  - {host: pay.internal, methods: [POST], path_prefix: /v1/payments/}
  - {host: files.internal, methods: [GET], path_prefix: /}
steps:
  - id: research
    uses: [model:openai/gpt-4o-mini, tool:kb/search, tool:kb/fetch_article, http:billing.internal,
           http:pay.internal]
  - id: review
    uses: [tool:files/read, http:files.internal]
    after: [research]
  - id: answer
    uses: [model:openai/gpt-4o-mini, model:anthropic/claude-haiku-4-5]
    after: [research]
  - id: publish
    uses: [http:billing.internal, tool:files/read]
    after: [answer, review]
"""
    + DEMO_BUDGETS
)


def with_version(intent: str, version: int) -> str:
    """The same intent as a later version: a fresh run of the same plan."""
    lines = [
        f"version: {version}" if line.startswith("version:") else line
        for line in intent.splitlines()
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Case:
    """One action as the agent sent it."""

    kind: str
    target: str
    args: dict[str, Any] = field(default_factory=dict)
    max_tokens: int = 0
    method: str = ""
    path: str = ""
    probe: bool = False
    unrepresentable: bool = False

    def args_json(self) -> bytes:
        # ensure_ascii: a lone surrogate travels as its \ud800 escape, as an agent's JSON would.
        return json.dumps(self.args).encode() if self.kind == "tool" and not self.probe else b""

    def policy_action(self) -> dict[str, Any]:
        """The action document the policy contract (policies/abc/authz.rego) describes."""
        action: dict[str, Any] = {"kind": self.kind, "target": self.target}
        if self.probe:
            action["probe"] = True
        elif self.kind == "tool":
            action["args"] = self.args
        elif self.kind == "model":
            action["max_tokens"] = self.max_tokens
        elif self.kind == "http":
            action["method"], action["path"] = self.method, self.path
        return action


class Reference:
    """OPA's Go engine with the policy and one manifest's data: what OPA would decide."""

    def __init__(self, modules: dict[str, str], data: dict[str, Any]) -> None:
        self._engine = OpaEngine()
        for name, source in sorted(modules.items()):
            if not name.endswith("_test.rego"):
                self._engine.add_policy(name, source)
        self._engine.add_data(data)

    def decide(self, case: Case, step: str, completed: list[str]) -> dict[str, Any]:
        policy_input = {
            "action": case.policy_action(),
            "run": {"step": step, "completed_steps": completed},
        }
        result: dict[str, Any] = self._engine.eval_document("abc.authz.decision", policy_input)
        return result

    def close(self) -> None:
        self._engine.close()


_TEXT = [
    "",
    "a",
    "ab",
    "ok",
    "OK!",
    "oké",
    "okay",
    "KB-1",
    "KB-12345678",
    "KB-123456789",
    "KB-1\x00../../etc/passwd",
    "KB-1\n",
    "é",
    "éé",
    "１２３",
    "１２３４５",
    "\\",
    "a\\b",
    "..\\..\\admin",
    "\x00",
    "\t\r\n",
    "\u202eevil",
    "日本語テキスト",
    "😀😀",
    "a/b",
    "abcdefghijkl",
    "abcdefghijklm",
    "word_1",
    "ｗｏｒｄ",
    "x" * 199,
    "x" * 200,
    "x" * 201,
]
_NUMBERS: list[Any] = [0, 1, 2, 3, 5, 19, 20, 21, -1, 0.5, 1.0000001, 0.999, 1.5, 5.5, -0.25, 1e-9]
_ARGS = {
    "tool:kb/search": ["query", "top_k", "lang", "score"],
    "tool:kb/fetch_article": ["article_id"],
    "tool:files/read": [
        "path",
        "name",
        "word",
        "flags",
        "opts",
        "dry",
        "nothing",
        "count",
        "level",
    ],
}
# Values each declared argument accepts, so that a good share of calls is allowed.
_GOOD: dict[str, list[Any]] = {
    "query": ["refund", "ab", "éé", "１２３４５"],
    "top_k": [1, 5, 20],
    "lang": ["en", "fr", "é"],
    "score": [0, 0.5, 1],
    "article_id": ["KB-1", "KB-42", "KB-12345678"],
    "path": ["ab", "１２３", "é"],
    "name": ["OKé", "ok!", "Ok."],
    "word": ["word_1", "abc"],
    "flags": [[1], []],
    "opts": [{}, {"a": 1}],
    "dry": [True, False],
    "nothing": [None],
    "count": [3, -2],
    "level": [1, 2, 3],
}
_REQUIRED = {"tool:kb/search": ["query"], "tool:kb/fetch_article": ["article_id"]}
_TOOLS = [*_ARGS, "tool:kb/serch", "tool:kb/fetch", "tool:evil/exfiltrate", "tool:files/write"]
_MODELS = [
    "model:openai/gpt-4o-mini",
    "model:anthropic/claude-haiku-4-5",
    "model:openai/gpt-4o",
    "model:openai/gpt-4o-mini-2024",
]
_HOSTS = [
    "http:billing.internal",
    "http:pay.internal",
    "http:files.internal",
    "http:evil.example",
    "http:billing.interna",
]
_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE"]
_SEGMENTS = [
    "42",
    "..",
    ".",
    "..;",
    "..;x",
    "%2e%2e",
    "%2E%2e",
    "%2f",
    "%5c",
    "%252e",
    "%c0%ae",
    "%e0%80%ae",
    "%f0%80%80%ae",
    "%ef%bc%8e",
    "a\\b",
    "caf%c3%a9",
    "x;y",
    "",
    "~",
    "a%20b",
    "%00",
]
_PREFIXES = ["/v1/invoices/", "/v1/payments/", "/v1/", "/", "/v1/invoices", "//v1/invoices/"]
_STEPS = ["research", "review", "answer", "publish", "unknown", "answr"]


def _value(rng: random.Random) -> tuple[Any, bool]:
    """A random argument value, and whether the engine can hold it exactly."""
    roll = rng.random()
    if roll < 0.45:
        return rng.choice(_TEXT), True
    if roll < 0.70:
        return rng.choice(_NUMBERS), True
    if roll < 0.78:
        return rng.choice([True, False, None]), True
    if roll < 0.85:
        return rng.choice([[], [1, "a"], {}, {"k": "v"}, [None]]), True
    if roll < 0.92:
        return "".join(rng.choice(_TEXT) for _ in range(rng.randint(2, 4))), True
    return rng.choice(["gpt\ud800", "\udfff", 2**53, 2**53 + 1, -(2**60)]), False


def _good_tool(rng: random.Random) -> Case:
    target = rng.choice(list(_ARGS))
    optional = [name for name in _ARGS[target] if name not in _REQUIRED.get(target, [])]
    chosen = _REQUIRED.get(target, []) + rng.sample(optional, rng.randint(0, len(optional)))
    return Case("tool", target, args={name: rng.choice(_GOOD[name]) for name in chosen})


def _tool(rng: random.Random) -> Case:
    if rng.random() < 0.4:
        return _good_tool(rng)
    target = rng.choice(_TOOLS)
    names = list(_ARGS.get(target, ["query"]))
    chosen = rng.sample(names, rng.randint(0, len(names)))
    if rng.random() < 0.1:
        chosen.append(rng.choice(["extra", "colour", "query", "id"]))
    drawn = {name: _value(rng) for name in chosen}
    args = {name: value for name, (value, _) in drawn.items()}
    exact = all(representable for _, representable in drawn.values())
    return Case("tool", target, args=args, unrepresentable=not exact)


def _http(rng: random.Random) -> Case:
    if rng.random() < 0.35:
        good = rng.choice(["42", "a%20b", "caf%c3%a9", "x;y", "~", "2026/11"])
        path = rng.choice(["/v1/invoices/", "/v1/payments/", "/docs/"]) + good
        return Case("http", rng.choice(_HOSTS[:3]), method=rng.choice(["GET", "POST"]), path=path)
    path = rng.choice(_PREFIXES) + "/".join(rng.choice(_SEGMENTS) for _ in range(rng.randint(1, 3)))
    if rng.random() < 0.04:
        path += rng.choice(["é", " ", "\x00", "\t"])  # not printable ASCII
    return Case(
        "http",
        rng.choice(_HOSTS),
        method=rng.choice(_METHODS),
        path=path,
        unrepresentable=not _mappable(path),
    )


def _mappable(path: str) -> bool:
    try:
        check_http_path(path)
    except MappingError:
        return False
    return True


def _case(rng: random.Random) -> Case:
    roll = rng.random()
    if roll < 0.45:
        return _tool(rng)
    if roll < 0.65:
        return _http(rng)
    if roll < 0.82:
        return Case("model", rng.choice(_MODELS), max_tokens=rng.choice([0, 1, 200, 1024, 4096]))
    if roll < 0.92:
        if rng.random() < 0.5:
            return Case("tool", rng.choice(_TOOLS), probe=True)
        return Case("model", rng.choice(_MODELS), probe=True)
    return Case("step", f"step:{rng.choice(_STEPS)}")


def cases(seed: int, count: int) -> list[Case]:
    rng = random.Random(seed)
    return [_case(rng) for _ in range(count)]
