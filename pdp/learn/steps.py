"""The steps of the next intent, as ``abcctl suggest`` reads them from the log: the steps
runs entered, the order they went in, and the step changes refused (listed, never learned:
the order of steps is the plan's). A step that would lose every capability is dropped if
no run ever entered it (the steps after it inherit its ``after``), and otherwise kept.
"""

from __future__ import annotations

from collections import Counter

from pdp.decisionlog import DecisionRecord
from pdp.learn.history import RunInfo, policy_answer
from pdp.learn.write import Draft
from pdp.manifest.model import Step

__all__ = ["entered_steps", "next_steps", "note_step_refusals", "observed_order", "step_of"]


def step_of(record: DecisionRecord) -> str:
    return str((record.input.get("run") or {}).get("step", ""))


def note_step_refusals(plan: Draft, decisions: list[DecisionRecord], examples: int) -> None:
    """Refused step changes are listed, never learned: the order of steps is the plan."""
    refused: dict[tuple[str, str], list[str]] = {}
    for record in decisions:
        answer = policy_answer(record)
        if record.action.get("kind") == "step" and not answer.get("allow"):
            message = str(answer["reasons"][0].get("message", ""))
            refused.setdefault((str(record.action["target"]), message), []).append(
                record.decision_id
            )
    for (target, message), ids in sorted(refused.items()):
        plan.notes.append(
            f"not proposed: {target} refused {len(ids)}x ({message}): the order of steps is"
            f" the plan's; e.g. {', '.join(ids[:examples])}"
        )


def entered_steps(decisions: list[DecisionRecord], runs: dict[str, RunInfo]) -> set[str]:
    entered = {run.manifest.assembly.steps[0].id for run in runs.values()}
    entered.update(step_of(r) for r in decisions)
    entered.update(r.step.to for r in decisions if r.step is not None)
    return entered


def observed_order(decisions: list[DecisionRecord], runs: dict[str, RunInfo]) -> list[str]:
    paths: dict[str, list[str]] = {
        run_id: [run.manifest.assembly.steps[0].id] for run_id, run in runs.items()
    }
    for record in decisions:
        if record.step is not None and record.run_id in paths:
            paths[record.run_id].append(record.step.to)
    counted = Counter(" -> ".join(path) for path in paths.values())
    return [f"{path} ({n} run{'s' if n > 1 else ''})" for path, n in counted.most_common()]


def next_steps(plan: Draft, entered: set[str]) -> list[Step]:
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
