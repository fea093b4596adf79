"""``abcctl suggest``: the next intent version, learned from a verified decision log.

Learning happens outside execution: this reads history and writes a file for a person
to review. It never freezes, signs or registers anything; ``abcctl freeze`` on the
result is the human's step, and a what-if ``abcctl replay`` shows first what it changes.

This module reads what the log says; ``infer`` holds the rules for values observed, ``steps``
the steps, ``budgets`` the budgets, ``write`` how the intent is written. From the runs of one
lineage (shadow and enforce alike; tools/list probes are not calls):

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
- A new tool's arguments follow ``infer.infer_args``; a new model's per-call cap is the
  largest ``max_tokens`` asked for; a new host gets the methods seen and the longest
  common directory of the paths seen.
- **Budgets** as ``budgets.size_budgets`` says.
- **Steps** keep their order; the order observed is stated. A step that would lose every
  capability is dropped if no run ever entered it, and otherwise keeps them.
- **Enforcement** stays as it was unless ``enforce`` asks for ``enforce``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from datetime import datetime
from fractions import Fraction
from typing import Any, Literal

from pdp.decisionlog import (
    DecisionRecord,
    Record,
    RegistrationRecord,
    SettlementRecord,
)
from pdp.errors import ConfigError
from pdp.learn.budgets import size_budgets
from pdp.learn.history import History, is_call, policy_answer
from pdp.learn.infer import ENUM_MAX, Unsure, clean_path, common_directory, infer_args, split_target
from pdp.learn.steps import (
    entered_steps,
    next_steps,
    note_step_refusals,
    observed_order,
    step_of,
)
from pdp.learn.write import Draft, as_intent, check_round_trip, next_intent, render_intent
from pdp.manifest.intent import Intent
from pdp.manifest.model import (
    HttpCapability,
    ModelCapability,
    ToolCapability,
)

__all__ = ["Suggestion", "suggest"]

_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_UNKNOWN_CODES = {
    "tool": "tool_not_allowed",
    "model": "model_not_allowed",
    "http": "http_not_allowed",
}
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
class Suggestion:
    intent: Intent
    text: str  # the next intent, with its comments: what `abcctl freeze` reads
    diff: str  # unified diff, current manifest (as an intent) -> next intent, no comments
    summary: list[str]  # one line per change, for the terminal


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


def suggest(
    history: History,
    manifest_digest: str,
    *,
    since: datetime | None = None,
    min_count: int = 2,
    headroom: Fraction = Fraction(3, 2),
    examples: int = 3,
    enforce: bool = False,
) -> Suggestion:
    """The next intent for the lineage of the manifest ``manifest_digest`` (a run of the log);
    ``enforce`` writes ``enforcement: enforce`` whatever the current mode."""
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
    plan = Draft(
        base,
        list(base.capabilities.models),
        list(base.capabilities.tools),
        list(base.capabilities.http),
        {s.id: list(s.uses) for s in base.assembly.steps},
    )
    additions = _learn_refusals(plan, calls, min_count, examples)
    note_step_refusals(plan, decisions, examples)
    entered = entered_steps(decisions, {r: runs[r] for r in active_runs})
    _remove_unused(plan, calls, entered, len(active_runs))
    allowed_next = {
        r.decision_id
        for r in calls
        if policy_answer(r).get("allow") or (str(r.action["target"]), step_of(r)) in additions
    }
    budgets = size_budgets(plan, records, calls, allowed_next, active_runs, headroom)
    steps = next_steps(plan, entered)
    version = max(run.version for run in runs.values()) + 1
    mode: Literal["enforce", "shadow"] = "enforce" if enforce else base.enforcement
    intent = next_intent(plan, version, budgets, steps, mode)
    order = observed_order(decisions, {r: runs[r] for r in active_runs})
    probes = sum(1 for r in decisions if r.action.get("probe"))
    step_changes = sum(1 for r in decisions if r.action.get("kind") == "step")
    counted = (
        f"{len(calls)} calls (model, tool and HTTP; not counted: {probes} tools/list"
        f" probe(s), {step_changes} step change(s))"
    )
    header = [
        f"Suggested by `abcctl suggest` from {history.path.name}: {len(active_runs)} run(s),"
        f" {counted}" + (f" since {since.isoformat()}" if since else "") + ",",
        f"log verified ({history.report.records} records, head {history.report.head}).",
        f"Learned for {base.metadata.lineage} v{base.metadata.version} ({manifest_digest}).",
        "Nothing here is in force. Review every PROPOSED entry (delete what you do not want),",
        "`abcctl freeze` it, and test the envelope on the same log before registering it:",
        "`abcctl replay LOG --pub PUB --manifest ENVELOPE --policies DIR` (a what-if).",
    ]
    if base.enforcement == "shadow":
        header.append(
            "enforcement: enforce, asked for by --enforce: calls outside this grant are refused."
            if enforce
            else "enforcement stays shadow: `abcctl suggest --enforce` (or `enforcement:"
            " enforce` here) refuses what this grant does not allow."
        )
    plan.step_notes["@order"] = [f"observed order: {line}" for line in order]
    text = render_intent(intent, plan, header)
    check_round_trip(text, intent)
    current_text = render_intent(as_intent(base), None, [])
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
        f" {len(active_runs)} run(s) and {counted}",
        *plan.summary,
        *(f"  ! {note}" for note in plan.notes),
        *(f"  observed step order: {line}" for line in order),
        f"  enforcement: {base.enforcement} -> {mode}"
        + ("" if enforce or mode == "enforce" else " (--enforce to refuse what it does not allow)"),
    ]
    return Suggestion(intent, text, diff, summary)


def _learn_refusals(
    plan: Draft, calls: list[DecisionRecord], min_count: int, examples: int
) -> set[tuple[str, str]]:
    """Add what recurred; note what did not or may not be learned. Returns the accepted
    (target, step) pairs: calls there will be allowed by the next version."""
    declared = plan.declared()
    groups: dict[tuple[str, str, str], _Group] = {}
    for record in calls:
        answer = policy_answer(record)
        if answer.get("allow"):
            continue
        action, step = record.action, step_of(record)
        codes = _codes(answer)
        target = str(action["target"])
        learn = ""
        if codes == [_UNKNOWN_CODES[action["kind"]]] and target not in declared:
            if action["kind"] != "http" or clean_path(str(action.get("path", ""))):
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


def _declare(
    plan: Draft,
    target: str,
    every_call: list[DecisionRecord],
    recurring: list[_Group],
    examples: int,
) -> str:
    """Declare an undeclared capability from its observed calls (``Unsure`` if impossible);
    returns a short description of what was declared."""
    kind, owner, name = split_target(target)
    count = sum(g.count for g in recurring)
    ids = [i for g in recurring for i in g.examples(examples)][:examples]
    lines = [
        f"PROPOSED: add {target}: refused {count}x {recurring[0].reason}"
        f" in step(s) {', '.join(g.step for g in recurring)},",
        f"  e.g. {', '.join(ids)}.",
    ]
    if kind == "tool":
        args, evidence = infer_args(
            [(r.action.get("args") or {}, _masked_args(r)) for r in every_call]
        )
        plan.tools.append(ToolCapability(server=owner, name=name, args=args))
        shown = ", ".join(f"{k}:{c.type}{'!' if c.required else ''}" for k, c in args.items())
        described = f"({shown or 'no arguments'})"
        lines.append(
            f"Arguments as observed in {len(every_call)} call(s): one type each, required when"
            f" always sent; an enum when a value recurred among at most {ENUM_MAX}, else"
            " bounds = the values seen (few values: check the bounds by hand):"
        )
        lines.extend(f"  {line}" for line in evidence)
    elif kind == "model":
        asked = [int(r.action.get("max_tokens") or 0) for r in every_call]
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
        clean = [r.action for r in every_call if clean_path(str(r.action.get("path", "")))]
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


def _remove_unused(plan: Draft, calls: list[DecisionRecord], entered: set[str], runs: int) -> None:
    used = {str(r.action["target"]) for r in calls}
    granted = plan.base.capabilities
    # Not resources and prompts: suggest carries them over as granted.
    learned = [*(c.target for c in granted.models), *(c.target for c in granted.tools)]
    learned += [c.target for c in granted.http]
    unused = [target for target in learned if target not in used]
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
