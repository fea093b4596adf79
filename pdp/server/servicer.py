"""gRPC adapter: ``abc.pdp.v1.DecisionService`` over ``pdp.service.DecisionService``.

A refusal is a normal ``DecideResponse`` (allow=false with reason codes). Registration
refusals are gRPC errors whose message is the reason code alone; details go to the log.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol, TypeVar

import grpc

from pdp.action import Action, action_from_proto
from pdp.api import pdp_pb2, pdp_pb2_grpc
from pdp.clock import utc_now
from pdp.decisionlog import Queued
from pdp.errors import AbcError, BadRequest, LogUnavailable, ReasonCode, StoreUnavailable
from pdp.service import DecisionBatch, DecisionService, HeldDecision

__all__ = ["DecisionServicer", "decide_wire"]

_REGISTRATION_STATUS = {
    ReasonCode.SIGNATURE_INVALID: grpc.StatusCode.PERMISSION_DENIED,
    ReasonCode.MANIFEST_EXPIRED: grpc.StatusCode.FAILED_PRECONDITION,
    ReasonCode.MANIFEST_ROLLBACK: grpc.StatusCode.FAILED_PRECONDITION,
    ReasonCode.POLICY_MISMATCH: grpc.StatusCode.FAILED_PRECONDITION,
    # The decision log could not record the registration: try again, as for any outage.
    ReasonCode.PDP_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}
_START_STATUS = {
    ReasonCode.MANIFEST_UNKNOWN: grpc.StatusCode.NOT_FOUND,
    ReasonCode.MANIFEST_EXPIRED: grpc.StatusCode.FAILED_PRECONDITION,
    ReasonCode.RUN_CLOSED: grpc.StatusCode.FAILED_PRECONDITION,
    ReasonCode.NOT_NARROWER: grpc.StatusCode.FAILED_PRECONDITION,
    ReasonCode.RUN_RELEASED: grpc.StatusCode.FAILED_PRECONDITION,
    ReasonCode.FLEET_RUNS_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ReasonCode.PDP_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}
# GetRun and RecordRefusal: an outage, or a run of another grant than the caller's.
_RUN_STATUS = {
    ReasonCode.PDP_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ReasonCode.RUN_NOT_BOUND: grpc.StatusCode.PERMISSION_DENIED,
}
MAX_ID_LENGTH = 128
MAX_BATCH = 1024
_Answer = TypeVar("_Answer", covariant=True)


class _Decider(Protocol[_Answer]):
    """``DecisionService`` (its answer given) or a ``DecisionBatch`` (its answer held)."""

    def decide(
        self, run_id: str, request_id: str, action: Action, now: datetime, bound: str = ""
    ) -> _Answer: ...

    def refuse(
        self, run_id: str, request_id: str, error: AbcError, now: datetime, bound: str = ""
    ) -> _Answer: ...


def decide_wire(
    decider: _Decider[_Answer],
    run_id: str,
    request_id: str,
    message: pdp_pb2.Action,
    now: datetime,
    bound: str = "",
) -> _Answer:
    """Decide an action as it came over the wire: validated first, and what is not valid
    refused (and logged) as a decision of its run."""
    try:
        action = action_from_proto(message)
    except AbcError as exc:
        return decider.refuse(run_id, request_id, exc, now, bound)
    return decider.decide(run_id, request_id, action, now, bound)


class DecisionServicer(pdp_pb2_grpc.DecisionServiceServicer):
    def __init__(self, service: DecisionService, clock: Callable[[], datetime] = utc_now) -> None:
        self._service = service
        self._clock = clock

    def RegisterManifest(  # noqa: N802 - gRPC method name
        self, request: pdp_pb2.RegisterManifestRequest, context: grpc.ServicerContext
    ) -> pdp_pb2.RegisterManifestResponse:
        try:
            run = self._service.register_manifest(request.envelope, self._clock())
        except AbcError as exc:
            context.set_trailing_metadata((("abc-reason", exc.reason.value),))
            # The reason code first (callers match it, or the abc-reason trailer), then the
            # explanation: key ids, digests, windows and what to do, never a secret.
            context.abort(
                _REGISTRATION_STATUS.get(exc.reason, grpc.StatusCode.INVALID_ARGUMENT),
                f"{exc.reason.value}: {exc}",
            )
        return pdp_pb2.RegisterManifestResponse(
            manifest_digest=run.verified.digest, run_id=run.run_id
        )

    def Decide(  # noqa: N802
        self, request: pdp_pb2.DecideRequest, context: grpc.ServicerContext
    ) -> pdp_pb2.DecideResponse:
        try:
            return self.decide(request)
        except BadRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def decide(self, request: pdp_pb2.DecideRequest) -> pdp_pb2.DecideResponse:
        """``Decide`` for any transport (gRPC, the decide socket); ``BadRequest`` for a
        request that is not judged at all."""
        (answer,) = self.decide_all([request])
        if isinstance(answer, Exception):
            raise answer
        return answer

    def decide_all(
        self, requests: Sequence[pdp_pb2.DecideRequest], wait_for_claims: bool = True
    ) -> list[pdp_pb2.DecideResponse | Exception]:
        """Each request decided in turn, as ``decide`` would, and all made durable with one
        commit before any is answered: each one's answer, or what refused it (``BadRequest``:
        not judged at all). ``wait_for_claims``: ``DecisionService.batch``'s."""
        begun: list[tuple[HeldDecision, list[Queued | None] | None] | Exception] = []
        with self._service.batch(wait_for_claims) as batch:
            for request in requests:
                try:
                    begun.append(self._begin(batch, request))
                except Exception as exc:  # that one fails as a lone decision would
                    begun.append(exc)
        answers: list[pdp_pb2.DecideResponse | Exception] = []
        for each in begun:
            try:
                answers.append(self._respond(*each) if isinstance(each, tuple) else each)
            except Exception as exc:
                answers.append(exc)
        return answers

    def _begin(
        self, batch: DecisionBatch, request: pdp_pb2.DecideRequest
    ) -> tuple[HeldDecision, list[Queued | None] | None]:
        now = self._clock()
        if len(request.settlements) > MAX_BATCH:
            raise BadRequest(f"at most {MAX_BATCH} settlements")
        # Settled first, their records queued: the decision's own commit makes them durable
        # with it, one fsync for both.
        carried = self._carry(batch, request.settlements, request.manifest_digest, now)
        run_id, request_id, bound = request.run_id, request.request_id, request.manifest_digest
        if not request_id or len(request_id) > MAX_ID_LENGTH:
            error = BadRequest("request_id is required (at most 128 characters)")
            return batch.refuse(run_id, request_id, error, now, bound), carried
        return decide_wire(batch, run_id, request_id, request.action, now, bound), carried

    def _respond(
        self, held: HeldDecision, carried: list[Queued | None] | None
    ) -> pdp_pb2.DecideResponse:
        outcome = held.outcome
        response = pdp_pb2.DecideResponse(
            allow=outcome.forward,
            shadow=not outcome.enforced,
            would_allow=outcome.decision.allow,
            reasons=[
                pdp_pb2.Reason(code=r.code.value, message=r.message)
                for r in outcome.decision.reasons
            ],
            decision_id=outcome.decision_id,
            reservation_id=outcome.reservation_id,
            settled=self._durable(carried),
        )
        if outcome.decision.obligations:  # a tool call's has none: no Struct to fill
            response.obligations.update(outcome.decision.obligations)
        return response

    def _carry(
        self,
        batch: DecisionBatch,
        reports: Sequence[pdp_pb2.ReportUsageRequest],
        bound: str,
        now: datetime,
    ) -> list[Queued | None] | None:
        """Settle ``reports`` without waiting for their records: each one's place in the
        log (None: not settled), or None for all when the store or the log is out (the
        caller sends them again; those settled meanwhile then answer false)."""
        try:
            # Checked per manifest at once (a sidecar states one): a report of another
            # grant's reservation is not settled; the others are, each checked already. A
            # caller bound to a manifest settles under it, whatever a report says.
            refused = {
                r.reservation_id
                for r in reports
                if bound and r.manifest_digest and r.manifest_digest != bound
            }
            for digest in {bound or report.manifest_digest for report in reports} - {""}:
                ids = [r.reservation_id for r in reports if (bound or r.manifest_digest) == digest]
                refused |= self._service.unbound(ids, digest, now)
            return [
                None
                if report.reservation_id in refused
                else batch.report_usage(
                    report.reservation_id, report.tokens, report.usd_micros, now
                )
                for report in reports
            ]
        except (StoreUnavailable, LogUnavailable):
            return None

    def _durable(self, carried: list[Queued | None] | None, within: float = 0.0) -> list[bool]:
        """Whether each carried settlement was settled, once all are durable; [] if they
        could not be made so."""
        queued = [q for q in carried or () if q is not None]
        try:
            if queued and within:
                # The last one queued: a commit that takes it takes those before it.
                self._service.wait_written(queued[-1], within)
            for each in queued:
                self._service.sync(each)
        except LogUnavailable:
            return []
        return [q is not None for q in carried or ()]

    def ReportUsage(  # noqa: N802
        self, request: pdp_pb2.ReportUsageRequest, context: grpc.ServicerContext
    ) -> pdp_pb2.ReportUsageResponse:
        if not self._settle(request, context, request.manifest_digest):
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown or already settled reservation")
        return pdp_pb2.ReportUsageResponse()

    def _settle(
        self, report: pdp_pb2.ReportUsageRequest, context: grpc.ServicerContext, bound: str
    ) -> bool:
        try:
            settled = self._service.report_usage(
                report.reservation_id, report.tokens, report.usd_micros, self._clock(), bound
            )
            return settled is not None
        except (StoreUnavailable, LogUnavailable):
            # Not "unknown": the sidecar keeps the report and tries again.
            context.abort(grpc.StatusCode.UNAVAILABLE, ReasonCode.PDP_UNAVAILABLE.value)
        except AbcError as exc:
            # Another grant's reservation (run_not_bound): not this caller's to settle.
            context.set_trailing_metadata((("abc-reason", exc.reason.value),))
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{exc.reason.value}: {exc}")

    def ReportUsageBatch(  # noqa: N802
        self, request: pdp_pb2.ReportUsageBatchRequest, context: grpc.ServicerContext
    ) -> pdp_pb2.ReportUsageBatchResponse:
        try:
            return self.settle(request)
        except BadRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except LogUnavailable:
            # Not "unknown": the sidecar keeps the reports and tries again.
            context.abort(grpc.StatusCode.UNAVAILABLE, ReasonCode.PDP_UNAVAILABLE.value)

    def settle(
        self, request: pdp_pb2.ReportUsageBatchRequest, within: float = 0.0
    ) -> pdp_pb2.ReportUsageBatchResponse:
        """``ReportUsageBatch`` for any transport: ``BadRequest`` for a batch over the limit,
        ``LogUnavailable`` when it could not be made durable (none of it is settled).
        Settled at once, answered once durable: ``within`` seconds may be waited for another
        commit (a decision's) to make it so, before it takes one of its own. With ``within``
        (a PDP whose settlements no other replica reads) a batch that asks for it
        (``confirm_by_decision``) is answered at once, ``pending``: its records go with the
        next commit, whoever makes it, and the caller's next decision confirms them."""
        if len(request.reports) > MAX_BATCH:
            raise BadRequest(f"at most {MAX_BATCH} reports")
        # One fsync for the batch, not one per report.
        with self._service.batch() as batch:
            carried = self._carry(batch, request.reports, "", self._clock())
        if carried is not None and within and request.confirm_by_decision:
            return pdp_pb2.ReportUsageBatchResponse(
                settled=[q is not None for q in carried], pending=True
            )
        settled = self._durable(carried, within)
        if len(settled) != len(request.reports):
            raise LogUnavailable(ReasonCode.PDP_UNAVAILABLE.value)
        return pdp_pb2.ReportUsageBatchResponse(settled=settled)

    def RecordRefusal(  # noqa: N802
        self, request: pdp_pb2.RecordRefusalRequest, context: grpc.ServicerContext
    ) -> pdp_pb2.RecordRefusalResponse:
        try:
            if len(request.request_id) > MAX_ID_LENGTH or len(request.run_id) > MAX_ID_LENGTH:
                raise BadRequest("request_id and run_id are at most 128 characters")
            try:
                reason = ReasonCode(request.reason)
            except ValueError as exc:
                raise BadRequest("reason is not in the closed set") from exc
            decision_id = self._service.record_refusal(
                request.run_id,
                request.request_id,
                request.route,
                reason,
                request.message,
                self._clock(),
                request.manifest_digest,
            )
        except AbcError as exc:
            status = _RUN_STATUS.get(exc.reason, grpc.StatusCode.INVALID_ARGUMENT)
            context.abort(status, exc.reason.value)
        return pdp_pb2.RecordRefusalResponse(decision_id=decision_id)

    def GetRun(  # noqa: N802
        self, request: pdp_pb2.GetRunRequest, context: grpc.ServicerContext
    ) -> pdp_pb2.GetRunResponse:
        try:
            view = self._service.get_run(request.run_id, self._clock(), request.manifest_digest)
        except AbcError as exc:
            status = _RUN_STATUS.get(exc.reason, grpc.StatusCode.NOT_FOUND)
            context.set_trailing_metadata((("abc-reason", exc.reason.value),))
            # run_released says the run existed and ended: not an id never seen.
            context.abort(status, f"{exc.reason.value}: {exc}")
        return pdp_pb2.GetRunResponse(
            step=view.step,
            completed_steps=list(view.completed_steps),
            status=view.status,
            manifest_digest=view.manifest_digest,
            spent=pdp_pb2.Budget(**view.spent),
            remaining=pdp_pb2.Budget(**view.remaining),
            reserved=pdp_pb2.Budget(**view.reserved),
            run_key=view.run_key,
            effective_digest=view.effective_digest,
            fleet=None
            if view.fleet is None
            else pdp_pb2.Fleet(
                spent=pdp_pb2.Budget(**view.fleet.spent),
                reserved=pdp_pb2.Budget(**view.fleet.reserved),
                remaining=pdp_pb2.Budget(**view.fleet.remaining),
                open=list(view.fleet.open),
                runs=view.fleet.runs,
                max_runs=view.fleet.max_runs,
            ),
        )

    def StartRun(  # noqa: N802
        self, request: pdp_pb2.StartRunRequest, context: grpc.ServicerContext
    ) -> pdp_pb2.StartRunResponse:
        try:
            run, started = self._service.start_run(
                request.manifest_digest, request.run_key, self._clock(), request.narrower
            )
        except AbcError as exc:
            context.set_trailing_metadata((("abc-reason", exc.reason.value),))
            # The reason code first, then which field (a narrower's) or what was wrong.
            context.abort(
                _START_STATUS.get(exc.reason, grpc.StatusCode.INVALID_ARGUMENT),
                f"{exc.reason.value}: {exc}",
            )
        return pdp_pb2.StartRunResponse(run_id=run.run_id, started=started)
