"""gRPC adapter: ``abc.pdp.v1.DecisionService`` over ``pdp.service.DecisionService``.

A refusal is a normal ``DecideResponse`` (allow=false with reason codes). Registration
refusals are gRPC errors whose message is the reason code alone; details go to the log.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from pdp.action import MAX_ARGS_BYTES, Action, validate_action
from pdp.api import pdp_pb2, pdp_pb2_grpc
from pdp.errors import AbcError, BadRequest, ReasonCode, StoreUnavailable
from pdp.service import DecisionService

__all__ = ["DecisionServicer", "action_from_json", "action_from_proto"]

_REGISTRATION_STATUS = {
    ReasonCode.SIGNATURE_INVALID: grpc.StatusCode.PERMISSION_DENIED,
    ReasonCode.MANIFEST_EXPIRED: grpc.StatusCode.FAILED_PRECONDITION,
    ReasonCode.MANIFEST_ROLLBACK: grpc.StatusCode.FAILED_PRECONDITION,
    ReasonCode.POLICY_MISMATCH: grpc.StatusCode.FAILED_PRECONDITION,
}
MAX_ID_LENGTH = 128
MAX_BATCH = 1024


def action_from_proto(message: pdp_pb2.Action) -> Action:
    args: dict[str, Any] | None = None
    if not message.args_json and message.HasField("args"):
        if message.args.ByteSize() > MAX_ARGS_BYTES:
            raise BadRequest(f"arguments over {MAX_ARGS_BYTES} bytes")
        args = json_format.MessageToDict(message.args)
    return validate_action(
        message.kind,
        message.target,
        args=args,
        args_json=message.args_json,
        max_tokens=message.max_tokens,
        method=message.method,
        path=message.path,
        probe=message.probe,
        input_bytes=message.input_bytes,
    )


# The Action message's fields, as the REST door takes them (proto field names).
_JSON_FIELDS = frozenset(
    {"kind", "target", "args", "max_tokens", "method", "path", "probe", "input_bytes"}
)


def action_from_json(value: Any) -> Action:
    """An ``Action`` from its JSON form (the REST door), through the same checks as gRPC's.

    The fields are the message's, by their proto names, typed by protobuf's JSON mapping;
    ``args`` is a plain JSON object carried as ``args_json``, so its integers stay exact
    instead of becoming a ``Struct``'s doubles.
    """
    if not isinstance(value, dict):
        raise BadRequest("input.action must be an object")
    if value.keys() - _JSON_FIELDS:
        # The caller's key names are not quoted back: they would reach the log verbatim.
        raise BadRequest(f"input.action takes only {', '.join(sorted(_JSON_FIELDS))}")
    message = pdp_pb2.Action()
    try:
        json_format.ParseDict({k: v for k, v in value.items() if k != "args"}, message)
    except json_format.ParseError as exc:
        # Not the parser's text: it quotes the caller's values, which end up in the log.
        raise BadRequest("input.action: a field has the wrong type") from exc
    args = value.get("args")
    if args is not None:
        if not isinstance(args, dict):
            raise BadRequest("arguments must be a JSON object")
        try:
            message.args_json = json.dumps(args, ensure_ascii=False, allow_nan=False).encode()
        except ValueError as exc:  # NaN and friends cannot reach here from strict JSON
            raise BadRequest("arguments hold a number JSON cannot carry") from exc
    return action_from_proto(message)


def _now() -> datetime:
    return datetime.now(UTC)


class DecisionServicer(pdp_pb2_grpc.DecisionServiceServicer):
    def __init__(self, service: DecisionService, clock: Callable[[], datetime] = _now) -> None:
        self._service = service
        self._clock = clock

    def RegisterManifest(  # noqa: N802 - gRPC method name
        self, request: pdp_pb2.RegisterManifestRequest, context: grpc.ServicerContext
    ) -> pdp_pb2.RegisterManifestResponse:
        try:
            run = self._service.register_manifest(request.envelope, self._clock())
        except AbcError as exc:
            context.set_trailing_metadata((("abc-reason", exc.reason.value),))
            context.abort(
                _REGISTRATION_STATUS.get(exc.reason, grpc.StatusCode.INVALID_ARGUMENT),
                exc.reason.value,
            )
        return pdp_pb2.RegisterManifestResponse(
            manifest_digest=run.verified.digest, run_id=run.run_id
        )

    def Decide(  # noqa: N802
        self, request: pdp_pb2.DecideRequest, context: grpc.ServicerContext
    ) -> pdp_pb2.DecideResponse:
        def build() -> Action:
            if not request.request_id or len(request.request_id) > MAX_ID_LENGTH:
                raise BadRequest("request_id is required (at most 128 characters)")
            return action_from_proto(request.action)

        outcome = self._service.decide(request.run_id, request.request_id, build, self._clock())
        obligations = struct_pb2.Struct()
        obligations.update(outcome.decision.obligations)
        return pdp_pb2.DecideResponse(
            allow=outcome.forward,
            shadow=not outcome.enforced,
            would_allow=outcome.decision.allow,
            reasons=[
                pdp_pb2.Reason(code=r.code.value, message=r.message)
                for r in outcome.decision.reasons
            ],
            decision_id=outcome.decision_id,
            obligations=obligations,
            reservation_id=outcome.reservation_id,
        )

    def ReportUsage(  # noqa: N802
        self, request: pdp_pb2.ReportUsageRequest, context: grpc.ServicerContext
    ) -> pdp_pb2.ReportUsageResponse:
        if not self._settle(request, context):
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown or already settled reservation")
        return pdp_pb2.ReportUsageResponse()

    def _settle(self, report: pdp_pb2.ReportUsageRequest, context: grpc.ServicerContext) -> bool:
        try:
            return self._service.report_usage(
                report.reservation_id, report.tokens, report.usd_micros, self._clock()
            )
        except StoreUnavailable:
            # Not "unknown": the sidecar keeps the report and tries again.
            context.abort(grpc.StatusCode.UNAVAILABLE, ReasonCode.PDP_UNAVAILABLE.value)

    def ReportUsageBatch(  # noqa: N802
        self, request: pdp_pb2.ReportUsageBatchRequest, context: grpc.ServicerContext
    ) -> pdp_pb2.ReportUsageBatchResponse:
        if len(request.reports) > MAX_BATCH:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_BATCH} reports")
        return pdp_pb2.ReportUsageBatchResponse(
            settled=[self._settle(r, context) for r in request.reports]
        )

    def GetRun(  # noqa: N802
        self, request: pdp_pb2.GetRunRequest, context: grpc.ServicerContext
    ) -> pdp_pb2.GetRunResponse:
        try:
            view = self._service.get_run(request.run_id, self._clock())
        except AbcError as exc:
            unavailable = exc.reason is ReasonCode.PDP_UNAVAILABLE
            status = grpc.StatusCode.UNAVAILABLE if unavailable else grpc.StatusCode.NOT_FOUND
            context.abort(status, exc.reason.value)
        return pdp_pb2.GetRunResponse(
            step=view.step,
            completed_steps=list(view.completed_steps),
            status=view.status,
            manifest_digest=view.manifest_digest,
            spent=pdp_pb2.Budget(**view.spent),
            remaining=pdp_pb2.Budget(**view.remaining),
        )
