"""Finding decisions in a verified log: ``abcctl audit list`` and the ``abcctl explain``
selectors (a whole decision id, a unique prefix of one, ``last`` or ``last-denied``).

A decision is *denied* when its result refused it; a shadow run's refusals are denied too
(the result is what enforcing would have answered) and are marked ``shadow``, since the
call went ahead. Probes (tools/list) and step changes are decisions like any other.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from pdp.clock import log_time
from pdp.decisionlog import DecisionRecord, WritableRecord

__all__ = [
    "LAST",
    "LAST_DENIED",
    "AmbiguousId",
    "DecisionFilter",
    "NotInLog",
    "Row",
    "find_decision",
    "list_decisions",
]

LAST, LAST_DENIED = "last", "last-denied"
_SHOWN_CANDIDATES = 10


class NotInLog(LookupError):
    """The log (verified) has no decision with that id."""


class AmbiguousId(LookupError):
    """A decision-id prefix that more than one decision of the log starts with."""


@dataclass(frozen=True)
class DecisionFilter:
    """Every field set must hold; ``None`` leaves it out."""

    denied: bool | None = None  # True: refused (or would have been, in shadow); False: allowed
    reason: str | None = None  # one of its reasons has this code
    run: str | None = None  # its run id starts with this
    since: datetime | None = None  # at or after
    until: datetime | None = None  # before

    def admits(self, record: DecisionRecord) -> bool:
        codes = {str(r["code"]) for r in record.result["reasons"]}
        return (
            (self.denied is None or self.denied == (not record.result["allow"]))
            and (self.reason is None or self.reason in codes)
            and (self.run is None or record.run_id.startswith(self.run))
            and (self.since is None or record.time >= self.since)
            and (self.until is None or record.time < self.until)
        )


@dataclass(frozen=True)
class Row:
    """One decision, as ``audit list`` shows it."""

    time: str
    decision_id: str
    run_id: str
    verdict: str  # allow, deny, or shadow-deny (refused by the policy, forwarded anyway)
    kind: str  # model, tool, http, step; "" when refused before it had an action
    target: str
    probe: bool
    reasons: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        target = self.target + (" (probe)" if self.probe else "")
        reasons = ",".join(self.reasons) or "-"
        return (
            f"{self.time}  {self.decision_id}  {self.run_id}  {self.verdict:<11}"
            f"  {target}  {reasons}"
        )


def _decisions(records: Iterable[WritableRecord]) -> Iterator[DecisionRecord]:
    return (r for r in records if isinstance(r, DecisionRecord))


def _row(record: DecisionRecord) -> Row:
    allowed = bool(record.result["allow"])
    verdict = "allow" if allowed else ("deny" if record.enforced else "shadow-deny")
    action = record.action
    return Row(
        time=log_time(record.time),
        decision_id=record.decision_id,
        run_id=record.run_id,
        verdict=verdict,
        kind=str(action.get("kind", "")),
        target=str(action.get("target", "")),
        probe=bool(action.get("probe")),
        reasons=[str(r["code"]) for r in record.result["reasons"]],
    )


def list_decisions(
    records: Iterable[WritableRecord], where: DecisionFilter, last: int | None = None
) -> list[Row]:
    """The decisions ``where`` admits, in log order; with ``last``, only the last ones."""
    rows = [_row(r) for r in _decisions(records) if where.admits(r)]
    return rows[-last:] if last else rows


def find_decision(records: Iterable[WritableRecord], selector: str) -> str:
    """The decision id ``selector`` names: itself, ``last``, ``last-denied``, or the one
    decision whose id starts with it (``AmbiguousId`` lists the candidates)."""
    decisions = list(_decisions(records))
    if selector in (LAST, LAST_DENIED):
        chosen = [d for d in decisions if selector == LAST or not d.result["allow"]]
        if not chosen:
            raise NotInLog(f"no {'denied ' if selector == LAST_DENIED else ''}decision in the log")
        return chosen[-1].decision_id
    matches = [d for d in decisions if d.decision_id.startswith(selector)]
    exact = [d for d in matches if d.decision_id == selector]
    if exact or len(matches) == 1:
        return (exact or matches)[0].decision_id
    if not matches:
        raise NotInLog(f"no decision {selector} in the log")
    shown = ", ".join(d.decision_id for d in matches[:_SHOWN_CANDIDATES])
    more = len(matches) - _SHOWN_CANDIDATES
    raise AmbiguousId(
        f"{len(matches)} decisions start with {selector}: {shown}"
        + (f" and {more} more" if more > 0 else "")
        + "; give more of the id"
    )
