"""``abcctl suggest``: the next intent version, learned from a verified decision log.

Learning happens outside execution: this reads history and writes a file for a person
to review. It never freezes, signs or registers anything; ``abcctl freeze`` on the
result is the human's step, and a what-if ``abcctl replay`` shows first what it changes.

From the runs of one lineage (shadow and enforce alike; tools/list probes are not calls):

- **Removed**: each capability of the current manifest that no call targeted.
- **Added**, each marked ``PROPOSED`` with its counts and example decision ids: a
  refusal *recurs* when the same target is refused for the same reason, in the same
  step, at least ``min_count`` times (default 2). Only two kinds of refusal are learned:
  an undeclared capability (``tool_not_allowed``, ``model_not_allowed``, or
  ``http_not_allowed`` for an undeclared host) is declared and added to the steps where
  it recurred; a declared capability refused in a step that does not list it
  (``step_out_of_order`` alone) is added to that step. Refused arguments, HTTP paths or
  methods of a declared host, and step changes are the manifest's deliberate limits:
  they are listed for the human, never widened.
- A new tool's arguments are inferred from every observed call of it and never wider
  than observed: one JSON type per argument, ``required`` when every call sent it,
  strings at most as long as the longest seen (and non-empty when none was empty),
  numbers within the observed minimum and maximum. A new model's per-call cap is the
  largest ``max_tokens`` asked for; a new host gets the methods seen and the longest
  common directory of the paths seen.
- **Budgets** from per-run use: tokens as the most the ledger had to hold at once
  (spent, plus held, plus the next reservation's worst case), money as settled, tool
  calls and requests as the calls the next version would allow; each proposed as the
  nearest-rank p95 across runs times ``headroom``, rounded up to two significant digits.
- **Steps** keep their order; the order observed is stated. A step that would lose every
  capability is dropped if no run ever entered it, and otherwise keeps them.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import yaml

from pdp.decisionlog import (
    DecisionRecord,
    Record,
    RegistrationRecord,
    SettlementRecord,
    WritableRecord,
)
from pdp.errors import ConfigError
from pdp.history import History, RunInfo, is_call, policy_answer
from pdp.ledger import BUDGETS, MemoryRunStore, Usage
from pdp.manifest.intent import Intent, IntentError, parse_intent
from pdp.manifest.model import (
    ArgConstraint,
    Budgets,
    HttpCapability,
    Manifest,
    ModelCapability,
    Step,
    ToolCapability,
)

__all__ = [
    "Suggestion",
    "common_directory",
    "infer_args",
    "nearest_rank_p95",
    "render_intent",
    "round_up",
    "suggest",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PLAIN = re.compile(r"[A-Za-z0-9/][A-Za-z0-9._/:@-]*")
_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_UNKNOWN_CODES = {
    "tool": "tool_not_allowed",
    "model": "model_not_allowed",
    "http": "http_not_allowed",
}
_UNLIMITED = 10**18
MASK = "***"


class Unsure(ValueError):
    """Observations that no capability could describe without guessing."""


# ---- small pure helpers (unit-tested) -------------------------------------------------


def nearest_rank_p95(values: Iterable[int]) -> int:
    ordered = sorted(values)
    if not ordered:
        return 0
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


def round_up(value: Fraction | int) -> int:
    """Up to an integer with at most two significant digits: 5325 -> 5400, 7 -> 7."""
    exact = Fraction(value)
    whole = -(-exact.numerator // exact.denominator)  # the ceiling, in integers
    if whole < 100:
        return whole
    step: int = 10 ** (len(str(whole)) - 2)
    return -(-whole // step) * step


def common_directory(paths: Iterable[str]) -> str:
    """The path prefix for observed paths: the path itself if only one was seen,
    else their longest common prefix cut back to a directory (ending in ``/``)."""
    distinct = sorted({path.split("?", 1)[0].split("#", 1)[0] for path in paths})
    if not distinct:
        raise Unsure("no path observed")
    if len(distinct) == 1:
        return distinct[0]
    prefix = distinct[0]
    for path in distinct[1:]:
        while not path.startswith(prefix):
            prefix = prefix[:-1]
    return prefix[: prefix.rfind("/") + 1]


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    if value is None:
        return "null"
    raise Unsure(f"unsupported value type {type(value).__name__}")


def infer_args(
    calls: list[tuple[dict[str, Any], frozenset[str]]],
) -> tuple[dict[str, ArgConstraint], list[str]]:
    """Constraints for a new tool from its observed calls ``(args, masked names)``.

    Never wider than observed (see the module's docstring); raises ``Unsure`` when one
    argument was sent with several JSON types. Returns notes for masked arguments.
    """
    names: list[str] = []
    for args, _ in calls:
        names.extend(name for name in args if name not in names)
    constraints: dict[str, ArgConstraint] = {}
    notes: list[str] = []
    for name in names:
        if not _NAME.fullmatch(name):
            raise Unsure(f"argument name {name!r} cannot be declared in a manifest")
        seen = [(args[name], name in masked) for args, masked in calls if name in args]
        values = [value for value, hidden in seen if not hidden]
        required = len(seen) == len(calls)
        kinds = {_json_type(value) for value in values}
        if kinds == {"integer", "number"}:
            kinds = {"number"}
        if len(kinds) > 1:
            raise Unsure(f"argument {name} was sent as {' and '.join(sorted(kinds))}")
        masked_seen = len(values) < len(seen)
        if not kinds:  # only ever masked: the log never saw a value
            notes.append(f"argument {name} is masked in the log: type string assumed, no bounds")
            constraints[name] = ArgConstraint(type="string", required=required)
            continue
        (kind,) = kinds
        bounds: dict[str, Any] = {}
        if kind == "string" and not masked_seen:
            lengths = [len(value) for value in values]
            bounds = {"minLength": 1} if min(lengths) > 0 else {}
            bounds["maxLength"] = max(lengths)
        elif kind == "string":
            notes.append(f"argument {name} is sometimes masked: no length bounds")
        elif kind in ("integer", "number"):
            bounds = {"minimum": math.floor(min(values)), "maximum": math.ceil(max(values))}
        constraints[name] = ArgConstraint(type=kind, required=required, **bounds)  # type: ignore[arg-type]
    return constraints, notes


def _split_target(target: str) -> tuple[str, str, str]:
    """``tool:kb/search`` -> ("tool", "kb", "search"); the first "/" splits owner and name."""
    kind, _, rest = target.partition(":")
    owner, _, name = rest.partition("/")
    return kind, owner, name


def _clean_path(path: str) -> bool:
    """The policy refuses unclean paths whatever the manifest says; never learn them."""
    segments = path.split("?", 1)[0].split("/")
    return (
        path.startswith("/")
        and "%" not in path
        and "\\" not in path
        and not any(re.fullmatch(r"\.\.?(;.*)?", segment, re.DOTALL) for segment in segments)
    )


# ---- what the log says ----------------------------------------------------------------


_DECLARE, _STEP = "declare", "step"  # what a recurring refusal teaches


@dataclass
class _Group:
    """Refused calls of one target, for one set of reasons, in one step."""

    target: str
    step: str
    reason: str  # the refusal's reason codes
    learn: str  # _DECLARE, _STEP, or "" for a refusal that is never learned
    messages: list[str] = field(default_factory=list)  # distinct, in order seen
    records: list[DecisionRecord] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.records)

    @property
    def runs(self) -> int:
        return len({r.run_id for r in self.records})

    def examples(self, limit: int) -> list[str]:
        return [r.decision_id for r in self.records[:limit]]


@dataclass
class _RunUse:
    """One run's use, as the next version's budgets must hold it."""

    tokens: int = 0
    usd_micros: int = 0
    tool_calls: int = 0
    requests: int = 0
    budget_refusals: int = 0


@dataclass
class Suggestion:
    intent: Intent
    text: str  # the next intent, with its comments: what `abcctl freeze` reads
    diff: str  # unified diff, current manifest (as an intent) -> next intent, no comments
    summary: list[str]  # one line per change, for the terminal


def _action(record: DecisionRecord) -> dict[str, Any]:
    action: dict[str, Any] = record.input["action"]
    return action


def _step_of(record: DecisionRecord) -> str:
    return str((record.input.get("run") or {}).get("step", ""))


def _codes(answer: dict[str, Any]) -> list[str]:
    return sorted({str(r["code"]) for r in answer.get("reasons") or []})


def _masked_args(record: DecisionRecord) -> frozenset[str]:
    prefix = "action.args."
    return frozenset(p[len(prefix) :] for p in record.masked if p.startswith(prefix))


def _run_of(record: Record) -> str | None:
    """The run a record is about; a refused registration and a checkpoint name none."""
    if isinstance(record, (RegistrationRecord, DecisionRecord, SettlementRecord)):
        return record.run_id
    return None


# ---- the suggestion --------------------------------------------------------------------


@dataclass
class _Plan:
    """The next intent's pieces while they are worked out, with their evidence."""

    base: Manifest
    models: list[ModelCapability]
    tools: list[ToolCapability]
    http: list[HttpCapability]
    uses: dict[str, list[str]]  # step id -> uses, in order
    before: dict[str, list[str]] = field(default_factory=dict)  # target/step -> comment lines
    step_notes: dict[str, list[str]] = field(default_factory=dict)  # step id -> comment lines
    removed: dict[str, Any] = field(default_factory=dict)  # target -> removed capability
    budget_notes: dict[str, str] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # refused, not proposed

    def declared(self) -> set[str]:
        return {
            *(c.target for c in self.models),
            *(c.target for c in self.tools),
            *(c.target for c in self.http),
        }


def suggest(
    history: History,
    manifest_digest: str,
    *,
    since: datetime | None = None,
    min_count: int = 2,
    headroom: Fraction = Fraction(3, 2),
    examples: int = 3,
) -> Suggestion:
    """The next intent for the lineage of the manifest ``manifest_digest`` (a run of the log)."""
    if min_count < 1:
        raise ConfigError("--min-count must be at least 1")
    if headroom < 1:
        raise ConfigError("--headroom must be at least 1 (budgets below observed use would refuse)")
    base_run = next(
        (r for r in history.runs.values() if r.manifest_digest == manifest_digest), None
    )
    if base_run is None:
        raise ConfigError(
            f"manifest {manifest_digest} was never registered in {history.path}:"
            " suggest learns from the runs of the manifest given"
        )
    base = base_run.manifest
    runs = history.lineage_runs(base.metadata.lineage)

    def current(record: Record) -> bool:
        return _run_of(record) in runs and (since is None or record.time >= since)

    records = [r for r in history.records if current(r)]
    decisions = [
        r for r in records if isinstance(r, DecisionRecord) and r.policy_result is not None
    ]
    calls = [r for r in decisions if is_call(r)]
    if not calls:
        window = f" since {since.isoformat()}" if since else ""
        raise ConfigError(
            f"no calls of lineage {base.metadata.lineage} in {history.path}{window}:"
            " nothing to learn from"
        )
    active_runs = sorted({r.run_id for r in calls})
    plan = _Plan(
        base,
        list(base.capabilities.models),
        list(base.capabilities.tools),
        list(base.capabilities.http),
        {s.id: list(s.uses) for s in base.assembly.steps},
    )
    additions = _learn_refusals(plan, calls, min_count, examples)
    _note_step_refusals(plan, decisions, examples)
    entered = _entered_steps(decisions, {r: runs[r] for r in active_runs})
    _remove_unused(plan, calls, entered, len(active_runs))
    budgets = _budgets(plan, records, calls, additions, active_runs, headroom)
    steps = _steps(plan, entered)
    version = max(run.version for run in runs.values()) + 1
    intent = _intent(base, version, plan, budgets, steps)
    order = _observed_order(decisions, {r: runs[r] for r in active_runs})
    header = [
        f"Suggested by `abcctl suggest` from {history.path.name}: {len(active_runs)} run(s),"
        f" {len(calls)} calls" + (f" since {since.isoformat()}" if since else "") + ",",
        f"log verified ({history.report.records} records, head {history.report.head}).",
        f"Learned for {base.metadata.lineage} v{base.metadata.version} ({manifest_digest}).",
        "Nothing here is in force. Review every PROPOSED entry (delete what you do not want),",
        "`abcctl freeze` it, and test the envelope on the same log before registering it:",
        "`abcctl replay LOG --pub PUB --manifest ENVELOPE --policies DIR` (a what-if).",
    ]
    if base.enforcement == "shadow":
        header.append(
            "enforcement stays shadow: set `enforcement: enforce` when the what-if is clean."
        )
    plan.step_notes["@order"] = [f"observed order: {line}" for line in order]
    text = render_intent(intent, plan, header)
    _check_round_trip(text, intent)
    current_text = render_intent(_as_intent(base), None, [])
    diff = "".join(
        difflib.unified_diff(
            current_text.splitlines(keepends=True),
            render_intent(intent, None, []).splitlines(keepends=True),
            f"{base.metadata.lineage} v{base.metadata.version} (current, as an intent)",
            f"{base.metadata.lineage} v{version} (suggested)",
        )
    )
    summary = [
        f"suggest: {base.metadata.lineage} v{base.metadata.version} -> v{version}, from"
        f" {len(active_runs)} run(s) and {len(calls)} calls",
        *plan.summary,
        *(f"  ! {note}" for note in plan.notes),
        *(f"  observed step order: {line}" for line in order),
    ]
    return Suggestion(intent, text, diff, summary)


def _learn_refusals(
    plan: _Plan, calls: list[DecisionRecord], min_count: int, examples: int
) -> set[tuple[str, str]]:
    """Add what recurred; note what did not or may not be learned. Returns the accepted
    (target, step) pairs: calls there will be allowed by the next version."""
    declared = plan.declared()
    groups: dict[tuple[str, str, str], _Group] = {}
    for record in calls:
        answer = policy_answer(record)
        if answer.get("allow"):
            continue
        action, step = _action(record), _step_of(record)
        codes = _codes(answer)
        target = str(action["target"])
        learn = ""
        if codes == [_UNKNOWN_CODES[action["kind"]]] and target not in declared:
            if action["kind"] != "http" or _clean_path(str(action.get("path", ""))):
                learn = _DECLARE
        elif codes == ["step_out_of_order"] and target in declared:
            learn = _STEP
        key = (target, step, ", ".join(codes))
        group = groups.setdefault(key, _Group(target, step, key[2], learn))
        if group.learn != learn:
            group.learn = ""  # one unclean path among the calls is enough not to learn any
        for reason in answer["reasons"]:
            if str(reason.get("message", "")) not in group.messages:
                group.messages.append(str(reason.get("message", "")))
        group.records.append(record)
    accepted: set[tuple[str, str]] = set()
    by_target: dict[str, list[_Group]] = {}
    for group in sorted(groups.values(), key=lambda g: (g.target, g.step, g.reason)):
        refused = f"{group.target} refused {group.count}x {group.reason} in step {group.step}"
        shown = ", ".join(group.examples(examples))
        if not group.learn:
            plan.notes.append(
                f"not proposed: {refused} ({'; '.join(group.messages)}): a limit of the"
                f" manifest, not widened; e.g. {shown}"
            )
        elif group.step not in plan.uses:
            plan.notes.append(f"not proposed: {refused}, a step the manifest does not have")
        elif group.count < min_count:
            plan.notes.append(
                f"not proposed: {refused}, below --min-count {min_count}; e.g. {shown}"
            )
        else:
            by_target.setdefault(group.target, []).append(group)
    for target, recurring in by_target.items():
        shown = target
        if recurring[0].learn == _DECLARE:
            every_call = [r for g in groups.values() if g.target == target for r in g.records]
            try:
                shown += " " + _declare(plan, target, every_call, recurring, examples)
            except Unsure as exc:
                plan.notes.append(f"not proposed: {target}: {exc}")
                continue
        for group in recurring:
            plan.uses[group.step].append(target)
            evidence = f"refused {group.count}x {group.reason} in {group.runs} run(s)"
            ids = f"e.g. {', '.join(group.examples(examples))}"
            plan.step_notes.setdefault(group.step, []).extend(
                [f"PROPOSED: + {target}: {evidence},", f"  {ids}"]
            )
            plan.summary.append(f"  + {shown} in step {group.step}: {evidence}, {ids}")
            accepted.add((target, group.step))
    return accepted


def _note_step_refusals(plan: _Plan, decisions: list[DecisionRecord], examples: int) -> None:
    """Refused step changes are listed, never learned: the order of steps is the plan."""
    refused: dict[tuple[str, str], list[str]] = {}
    for record in decisions:
        answer = policy_answer(record)
        if _action(record).get("kind") == "step" and not answer.get("allow"):
            message = str(answer["reasons"][0].get("message", ""))
            refused.setdefault((str(_action(record)["target"]), message), []).append(
                record.decision_id
            )
    for (target, message), ids in sorted(refused.items()):
        plan.notes.append(
            f"not proposed: {target} refused {len(ids)}x ({message}): the order of steps is"
            f" the plan's; e.g. {', '.join(ids[:examples])}"
        )


def _declare(
    plan: _Plan,
    target: str,
    every_call: list[DecisionRecord],
    recurring: list[_Group],
    examples: int,
) -> str:
    """Declare an undeclared capability from its observed calls (``Unsure`` if impossible);
    returns a short description of what was declared."""
    kind, owner, name = _split_target(target)
    count = sum(g.count for g in recurring)
    ids = [i for g in recurring for i in g.examples(examples)][:examples]
    lines = [
        f"PROPOSED: add {target}: refused {count}x {recurring[0].reason}"
        f" in step(s) {', '.join(g.step for g in recurring)},",
        f"  e.g. {', '.join(ids)}.",
    ]
    if kind == "tool":
        args, notes = infer_args(
            [(_action(r).get("args") or {}, _masked_args(r)) for r in every_call]
        )
        plan.tools.append(ToolCapability(server=owner, name=name, args=args))
        shown = ", ".join(f"{k}:{c.type}{'!' if c.required else ''}" for k, c in args.items())
        described = f"({shown or 'no arguments'})"
        lines.append(
            f"Arguments as observed in {len(every_call)} call(s): one type each, required when"
            " always sent, bounds = the values seen."
        )
        lines.extend(notes)
    elif kind == "model":
        asked = [int(_action(r).get("max_tokens") or 0) for r in every_call]
        cap = max(asked)
        if cap <= 0:
            cap = max((m.max_tokens_per_call for m in plan.models), default=1024)
            lines.append(f"No call asked for max_tokens: cap {cap} copied from the largest model.")
        else:
            lines.append(
                f"max_tokens_per_call = the largest max_tokens asked ({len(asked)} calls)."
            )
        plan.models.append(ModelCapability(provider=owner, model=name, max_tokens_per_call=cap))
        described = f"(max_tokens_per_call {cap})"
    else:
        clean = [_action(r) for r in every_call if _clean_path(str(_action(r).get("path", "")))]
        methods = {str(a["method"]) for a in clean}
        prefix = common_directory(str(a["path"]) for a in clean)
        plan.http.append(
            HttpCapability(
                host=owner,
                methods=tuple(m for m in _METHOD_ORDER if m in methods),  # type: ignore[misc]
                path_prefix=prefix,
            )
        )
        lines.append(
            f"Methods and path prefix as observed in {len(clean)} call(s)"
            " (the longest common directory of the paths)."
        )
        described = f"({'|'.join(sorted(methods))} {prefix}*)"
    plan.before[target] = lines
    return described


def _remove_unused(plan: _Plan, calls: list[DecisionRecord], entered: set[str], runs: int) -> None:
    used = {str(_action(r)["target"]) for r in calls}
    unused = [t for t in plan.base.capabilities.target_list() if t not in used]
    for target in unused:
        emptied = [s for s, uses in plan.uses.items() if uses == [target] and s in entered]
        if emptied:
            plan.notes.append(
                f"kept {target}, never called: step {emptied[0]} was entered and would be empty"
            )
            continue
        for step, uses in plan.uses.items():
            if target in uses:
                uses.remove(target)
                plan.step_notes.setdefault(step, []).append(f"removed: - {target} (never called)")
        kept_models = [c for c in plan.models if c.target != target]
        kept_tools = [c for c in plan.tools if c.target != target]
        kept_http = [c for c in plan.http if c.target != target]
        every: list[ModelCapability | ToolCapability | HttpCapability] = [
            *plan.models,
            *plan.tools,
            *plan.http,
        ]
        plan.removed[target] = next(c for c in every if c.target == target)
        plan.models, plan.tools, plan.http = kept_models, kept_tools, kept_http
        plan.summary.append(f"  - {target}: never called in {runs} run(s)")


def _entered_steps(decisions: list[DecisionRecord], runs: dict[str, RunInfo]) -> set[str]:
    entered = {run.manifest.assembly.steps[0].id for run in runs.values()}
    entered.update(_step_of(r) for r in decisions)
    entered.update(r.step.to for r in decisions if r.step is not None)
    return entered


def _observed_order(decisions: list[DecisionRecord], runs: dict[str, RunInfo]) -> list[str]:
    paths: dict[str, list[str]] = {
        run_id: [run.manifest.assembly.steps[0].id] for run_id, run in runs.items()
    }
    for record in decisions:
        if record.step is not None and record.run_id in paths:
            paths[record.run_id].append(record.step.to)
    counted = Counter(" -> ".join(path) for path in paths.values())
    return [f"{path} ({n} run{'s' if n > 1 else ''})" for path, n in counted.most_common()]


def _steps(plan: _Plan, entered: set[str]) -> list[Step]:
    """The current steps with their new uses; empty, never-entered steps dropped (the steps
    after one inherit its own ``after``, so the order is unchanged)."""
    dropped: dict[str, tuple[str, ...]] = {}
    steps: list[Step] = []
    for step in plan.base.assembly.steps:
        after: list[str] = []
        for name in step.after:
            for replacement in dropped.get(name, (name,)):
                if replacement not in after:
                    after.append(replacement)
        if not plan.uses[step.id] and step.id not in entered:
            dropped[step.id] = tuple(after)
            plan.summary.append(f"  - step {step.id}: never entered, and nothing left to use")
            continue
        uses = list(dict.fromkeys(plan.uses[step.id]))
        steps.append(Step(id=step.id, uses=tuple(uses), after=tuple(after)))
    return steps


def _budgets(
    plan: _Plan,
    records: list[WritableRecord],
    calls: list[DecisionRecord],
    accepted: set[tuple[str, str]],
    runs: list[str],
    headroom: Fraction,
) -> Budgets:
    use = {run_id: _RunUse() for run_id in runs}
    # Tokens: what the ledger had to hold at the peak, with its own run store, unlimited.
    store = MemoryRunStore()
    for run_id in runs:
        store.open(run_id, "-", Usage(*[_UNLIMITED] * len(BUDGETS)), "", 0)
    for record in records:
        run = use.get(_run_of(record) or "")
        if run is None:
            continue
        if isinstance(record, SettlementRecord):
            store.settle(record.reservation_id, record.tokens, record.usd_micros)
        elif isinstance(record, DecisionRecord) and record.cost and record.reservation_id:
            books = store.books(record.run_id)
            held = books.spent.tokens + books.reserved.tokens + int(record.cost["tokens"])
            run.tokens = max(run.tokens, held)
            store.hold(record.run_id, record.reservation_id, Usage(**record.cost), _END)
    for run_id, run in use.items():
        books = store.books(run_id)
        run.tokens = max(run.tokens, books.spent.tokens + books.reserved.tokens)
        run.usd_micros = books.spent.usd_micros
    # Calls: those the next version allows (allowed then, or learned now), made or not.
    for record in calls:
        run = use[record.run_id]
        answer = policy_answer(record)
        target = str(_action(record)["target"])
        if answer.get("allow") or (target, _step_of(record)) in accepted:
            run.requests += 1
            run.tool_calls += _action(record)["kind"] == "tool"
        final = record.result
        if answer.get("allow") and _codes(final) == ["budget_exhausted"]:
            run.budget_refusals += 1
    proposed: dict[str, int] = {}
    current = plan.base.budgets.model_dump()
    for name in BUDGETS:
        values = [getattr(run, name) for run in use.values()]
        p95, most = nearest_rank_p95(values), max(values)
        if most == 0:
            proposed[name] = current[name]
            plan.budget_notes[name] = f"no {name} observed in {len(values)} run(s): kept"
            continue
        proposed[name] = round_up(Fraction(p95) * headroom)
        plan.budget_notes[name] = (
            f"{len(values)} run(s): max {most}, p95 {p95}; proposed p95 x {_ratio(headroom)},"
            " rounded up"
        )
        if most > proposed[name]:
            plan.budget_notes[name] += f" (the largest run, {most}, would NOT fit)"
        plan.summary.append(
            f"  ~ budget {name}: {current[name]} -> {proposed[name]} ({plan.budget_notes[name]})"
        )
    truncated = [run_id for run_id, run in use.items() if run.budget_refusals]
    if truncated:
        plan.notes.append(
            f"run(s) {', '.join(truncated)} were refused calls for budget (budget_exhausted):"
            " their use is a lower bound"
        )
    return Budgets(**proposed)


_END = datetime(9999, 1, 1, tzinfo=UTC)  # the log's settlements end reservations, not time


def _ratio(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else str(float(value))


def _lifetime(manifest: Manifest) -> str:
    seconds = int((manifest.expires_at - manifest.not_before).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _intent(
    base: Manifest, version: int, plan: _Plan, budgets: Budgets, steps: list[Step]
) -> Intent:
    meta = base.metadata
    return Intent(
        tenant=meta.tenant,
        agent=meta.agent,
        lineage=meta.lineage,
        version=version,
        goal=meta.goal,
        enforcement=base.enforcement,
        lifetime=_lifetime(base),
        models=tuple(plan.models),
        tools=tuple(plan.tools),
        http=tuple(plan.http),
        budgets=budgets,
        steps=tuple(steps),
    )


def _as_intent(base: Manifest) -> Intent:
    """The current manifest written as the intent it was frozen from (less its start time)."""
    meta = base.metadata
    return Intent(
        tenant=meta.tenant,
        agent=meta.agent,
        lineage=meta.lineage,
        version=meta.version,
        goal=meta.goal,
        enforcement=base.enforcement,
        lifetime=_lifetime(base),
        models=base.capabilities.models,
        tools=base.capabilities.tools,
        http=base.capabilities.http,
        budgets=base.budgets,
        steps=base.assembly.steps,
    )


# ---- writing YAML ---------------------------------------------------------------------


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and yaml.safe_load(text) == text:
        return text
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


def _flow(items: Iterable[str]) -> str:
    return "[" + ", ".join(_scalar(item) for item in items) + "]"


def _constraint(constraint: ArgConstraint) -> str:
    fields = constraint.model_dump(exclude_none=True)
    if not fields.get("required"):
        fields.pop("required", None)
    parts = []
    for key, value in fields.items():
        shown = _flow(value) if isinstance(value, tuple | list) else _scalar(value)
        parts.append(f"{key}: {shown}")
    return "{" + ", ".join(parts) + "}"


def _comment(lines: Iterable[str], indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in lines]


def _capability_lines(capability: Any) -> list[str]:
    if isinstance(capability, ModelCapability):
        return [
            f"- provider: {_scalar(capability.provider)}",
            f"  model: {_scalar(capability.model)}",
            f"  max_tokens_per_call: {capability.max_tokens_per_call}",
        ]
    if isinstance(capability, ToolCapability):
        lines = [f"- server: {_scalar(capability.server)}", f"  name: {_scalar(capability.name)}"]
        if capability.args:
            lines.append("  args:")
            lines.extend(
                f"    {_scalar(name)}: {_constraint(c)}" for name, c in capability.args.items()
            )
        return lines
    assert isinstance(capability, HttpCapability)
    return [
        f"- host: {_scalar(capability.host)}",
        f"  methods: {_flow(capability.methods)}",
        f"  path_prefix: {_scalar(capability.path_prefix)}",
    ]


def render_intent(intent: Intent, plan: _Plan | None, header: list[str]) -> str:
    """The intent as YAML in the demo intent's layout; with ``plan``, its evidence as comments."""
    notes: Callable[[str], list[str]] = (
        (lambda key: plan.before.get(key, [])) if plan else (lambda key: [])
    )
    out = _comment(header, "")
    out += [
        "apiVersion: abc/v1",
        "kind: RunIntent",
        f"tenant: {_scalar(intent.tenant)}",
        f"agent: {_scalar(intent.agent)}",
        f"lineage: {_scalar(intent.lineage_name)}",
        f"version: {intent.version}",
        f"goal: {_scalar(intent.goal)}",
        f"enforcement: {intent.enforcement}",
        f"lifetime: {intent.lifetime}",
    ]
    sections: list[tuple[str, tuple[Any, ...], type]] = [
        ("models", intent.models, ModelCapability),
        ("tools", intent.tools, ToolCapability),
        ("http", intent.http, HttpCapability),
    ]
    for name, capabilities, kind in sections:
        removed = [c for c in (plan.removed.values() if plan else []) if isinstance(c, kind)]
        out.append("")
        out.append(f"{name}:" if capabilities else f"{name}: []")
        for capability in capabilities:
            out += _comment(notes(capability.target), "  ")
            out += ["  " + line for line in _capability_lines(capability)]
        for capability in removed:
            out.append("  # REMOVED, never called (restore it here and in steps to keep it):")
            out += ["  # " + line for line in _capability_lines(capability)]
    out += ["", "budgets:"]
    for name in BUDGETS:
        if plan and name in plan.budget_notes:
            out += _comment([plan.budget_notes[name]], "  ")
        out.append(f"  {name}: {getattr(intent.budgets, name)}")
    out += ["", "steps:"]
    if plan:
        out += _comment(plan.step_notes.get("@order", []), "  ")
    for step in intent.steps:
        if plan:
            out += _comment(plan.step_notes.get(step.id, []), "  ")
        out.append(f"  - id: {_scalar(step.id)}")
        out.append(f"    uses: {_flow(step.uses)}")
        if step.after:
            out.append(f"    after: {_flow(step.after)}")
    return "\n".join(out) + "\n"


def _check_round_trip(text: str, intent: Intent) -> None:
    """What is written must read back as exactly the intent meant (a writer bug is loud)."""
    try:
        parsed = parse_intent(text, "<suggested intent>")
    except IntentError as exc:
        raise ConfigError(f"suggest wrote an intent that does not parse: {exc}") from exc
    if parsed != intent:
        raise ConfigError("suggest wrote an intent that reads back differently")
