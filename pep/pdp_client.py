"""The PEP's way to the PDP: the public gRPC API (decisions on the decide socket when it
is given), with a deadline, failing closed.

Any error, timeout or malformed answer becomes a refusal with ``pdp_unavailable``
and a locally made decision id, so every refusal can still be traced.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from pdp.api import ReasonCode, pdp_pb2, pdp_pb2_grpc
from pdp.api.mapping import MAX_TOKENS
from pep.decide_socket import DecideSocketClient, DecideSocketError, TlsPeer
from pep.usage_reporter import UsageReporter

__all__ = ["PdpClient", "PdpTls", "Verdict"]

log = logging.getLogger("abc.pep")


@dataclass(frozen=True)
class Verdict:
    allow: bool
    reason: ReasonCode | None
    message: str
    decision_id: str
    obligations: dict[str, Any] = field(default_factory=dict)
    reservation_id: str = ""
    # A shadow run's answer: allow is true, and reason (if any) is the refusal that
    # enforcing would have given.
    shadow: bool = False

    @staticmethod
    def refuse(reason: ReasonCode, message: str) -> Verdict:
        """A refusal made by the PEP itself (no PDP decision behind it)."""
        return Verdict(False, reason, message, "pep_" + uuid.uuid4().hex)


def _obligations(response: pdp_pb2.DecideResponse, action: pdp_pb2.Action) -> dict[str, Any]:
    """The obligations, each one checked before the sidecar applies it: one it cannot check
    or apply (``max_tokens`` of "10" or -5, an unknown key, a model call allowed uncapped)
    makes the whole answer malformed, which fails closed."""
    # Read from the Struct's fields as they are, not through a dict conversion: on every
    # request, and a number must be a number_value, not a string or bool that converts.
    fields = response.obligations.fields
    if len(fields) - ("max_tokens" in fields):  # a key but max_tokens
        raise ValueError("an obligation the sidecar cannot apply")
    obligations: dict[str, Any] = {}
    if "max_tokens" in fields:
        value = fields["max_tokens"]
        if action.kind != "model" or value.WhichOneof("kind") != "number_value":
            raise ValueError("max_tokens obliges a model call to a number")
        cap = value.number_value  # a Struct number arrives as a double
        if not cap.is_integer() or not 1 <= cap <= MAX_TOKENS:
            raise ValueError(f"max_tokens must be an integer from 1 to {MAX_TOKENS}")
        obligations["max_tokens"] = int(cap)
    elif action.kind == "model" and (response.would_allow if response.shadow else response.allow):
        # Only a shadow run forwards a call the policy refused, and that one has no cap.
        raise ValueError("a model call allowed without a token cap")
    return obligations


def _verdict(response: pdp_pb2.DecideResponse, action: pdp_pb2.Action) -> Verdict:
    """Trust an answer only if it is well formed; otherwise fail closed."""
    if not response.decision_id:
        raise ValueError("answer without a decision id")
    codes = [reason.code for reason in response.reasons]
    if response.shadow and not response.allow:
        raise ValueError("a shadow answer refuses nothing")
    if (response.would_allow if response.shadow else response.allow) == bool(codes):
        raise ValueError("an allow carries no reasons and a refusal at least one")
    first = response.reasons[0] if codes else None
    return Verdict(
        allow=response.allow,
        reason=ReasonCode(first.code) if first else None,  # ValueError for an unknown code
        message=first.message if first else "",
        decision_id=response.decision_id,
        obligations=_obligations(response, action),
        reservation_id=response.reservation_id,
        shadow=response.shadow,
    )


def _refusal_reason(exc: grpc.aio.AioRpcError) -> ReasonCode:
    """The reason code a PDP refusal carries (trailing metadata ``abc-reason``); any other
    failure, or a code outside the closed set, is ``pdp_unavailable``."""
    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        for key, value in exc.trailing_metadata() or ():
            if key == "abc-reason" and isinstance(value, str):
                try:
                    return ReasonCode(value)
                except ValueError:
                    break
    return ReasonCode.PDP_UNAVAILABLE


@dataclass(frozen=True)
class PdpTls:
    """PEM bytes for a TLS channel to the PDP; the client pair is optional, the CA is not."""

    root_certificates: bytes
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None  # the name checked in the PDP's certificate, if not the host


def _channel(target: str, tls: PdpTls | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        tls.root_certificates, tls.private_key, tls.certificate_chain
    )
    options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    # A failed handshake (wrong CA, refused client certificate) surfaces as UNAVAILABLE on
    # the call, which decide() turns into a pdp_unavailable refusal: TLS fails closed too.
    return grpc.aio.secure_channel(target, credentials, options=options)


class PdpClient:
    def __init__(
        self,
        target: str,
        deadline_seconds: float,
        tls: PdpTls | None = None,
        settle_linger: float = 0.1,
        decide_socket: Path | TlsPeer | None = None,
    ) -> None:
        self._channel = _channel(target, tls)
        # Decisions on the PDP's decide socket (on this host, or over TLS); gRPC otherwise.
        self._socket = DecideSocketClient(decide_socket) if decide_socket else None
        self._stub = pdp_pb2_grpc.DecisionServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._deadline = deadline_seconds
        # Settlements wait this long for a decision to carry them, then go in a batch: an
        # agent's next call mostly follows its last within it (a tool's result goes straight
        # back to the model), and a reservation settled later only holds its worst case.
        self._usage = UsageReporter(self._stub, deadline_seconds, settle_linger, self._socket)
        # The manifest this sidecar registered, stated on every call: the PDP refuses a run
        # of another grant (run_not_bound). "" until registered (a --run sidecar).
        self._bound = ""

    async def decide(self, run_id: str, request_id: str, action: pdp_pb2.Action) -> Verdict:
        carried = self._usage.take()  # settled with this decision: one call, one fsync
        request = pdp_pb2.DecideRequest(
            run_id=run_id,
            request_id=request_id,
            action=action,
            manifest_digest=self._bound,
            settlements=carried,
        )
        try:
            if self._socket is not None:
                response = await self._socket.decide(request, self._deadline)
            else:
                response = await self._stub.Decide(request, timeout=self._deadline)
        except (grpc.aio.AioRpcError, DecideSocketError) as exc:
            why = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            log.warning("PDP did not decide: %s", why)
            self._usage.unsettled(carried)
            return Verdict.refuse(
                ReasonCode.PDP_UNAVAILABLE, "the policy decision point did not answer"
            )
        except BaseException:
            # Cancelled (a shutdown, a bridge closing) or a bug: the settlements may not have
            # reached the PDP. Sent again; one it settled meanwhile answers false, once.
            self._usage.unsettled(carried)
            raise
        if len(response.settled) != len(carried):
            # Not made durable (an outage), or a PDP that does not read carried settlements.
            self._usage.unsettled(carried)
        try:
            return _verdict(response, action)
        except (ValueError, TypeError) as exc:
            log.error("PDP answered garbage: %s", exc)
        return Verdict.refuse(
            ReasonCode.PDP_UNAVAILABLE, "the policy decision point did not answer"
        )

    @property
    def transport(self) -> str:
        """The way decisions go to the PDP (one of ``pep.metrics.TRANSPORTS``)."""
        return "grpc" if self._socket is None else self._socket.peer.transport

    async def check_decide_socket(self) -> str | None:
        """Why decisions cannot go to the decide socket, or None when they can (or when
        there is none: gRPC)."""
        if self._socket is None:
            return None
        try:
            await self._socket.check(self._deadline)
        except DecideSocketError as exc:
            return str(exc)
        return None

    async def record_refusal(
        self, run_id: str, request_id: str, route: str, verdict: Verdict
    ) -> Verdict:
        """Log a refusal the sidecar made itself in the PDP's decision log; the same refusal
        under the logged decision id, or unchanged (its local ``pep_`` id) if the PDP could
        not log it. Refused either way: logging never turns a refusal into anything else."""
        assert verdict.reason is not None and not verdict.allow
        request = pdp_pb2.RecordRefusalRequest(
            run_id=run_id,
            request_id=request_id,
            route=route,
            reason=verdict.reason.value,
            message=verdict.message[:200],
            manifest_digest=self._bound,
        )
        try:
            response = await self._stub.RecordRefusal(request, timeout=self._deadline)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            log.warning("refusal %s not in the decision log: %s", verdict.decision_id, code)
            return verdict
        if not response.decision_id.startswith("dec_"):
            log.error("PDP answered garbage to a refusal record")
            return verdict
        return dataclasses.replace(verdict, decision_id=response.decision_id)

    def report_usage(self, reservation_id: str, tokens: int, usd_micros: int = 0) -> None:
        """Queue a settlement; it reaches the PDP in the next batch."""
        self._usage.report(reservation_id, tokens, usd_micros, self._bound)

    async def register(self, envelope: bytes, timeout: float = 10.0) -> tuple[str, str]:
        """(manifest digest, its default run id)."""
        response = await self._stub.RegisterManifest(
            pdp_pb2.RegisterManifestRequest(envelope=envelope), timeout=timeout
        )
        self._bound = str(response.manifest_digest)
        return self._bound, str(response.run_id)

    async def start_run(
        self, manifest_digest: str, run_key: str, narrower: bytes = b""
    ) -> str | Verdict:
        """The run id of ``run_key`` under the grant (narrowed by ``narrower``, JSON, if
        given), or the refusal to answer with: the PDP's reason when it refused (a malformed
        key, an expired grant, a narrower that widens it), else ``pdp_unavailable``."""
        request = pdp_pb2.StartRunRequest(
            manifest_digest=manifest_digest, run_key=run_key, narrower=narrower
        )
        try:
            response = await self._stub.StartRun(request, timeout=self._deadline)
        except grpc.aio.AioRpcError as exc:
            log.warning("PDP did not start a run: %s", exc.code().name)
            reason = _refusal_reason(exc)
            return Verdict.refuse(reason, f"the run of this run key was not started: {reason}")
        if not response.run_id.startswith("run_"):
            log.error("PDP answered garbage to StartRun")
            return Verdict.refuse(ReasonCode.PDP_UNAVAILABLE, "the run was not started")
        return str(response.run_id)

    async def close(self) -> None:
        await self._usage.flush()
        if self._socket is not None:
            await self._socket.close()
        await self._channel.close()
