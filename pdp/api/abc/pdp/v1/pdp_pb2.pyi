from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterManifestRequest(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: bytes
    def __init__(self, envelope: _Optional[bytes] = ...) -> None: ...

class RegisterManifestResponse(_message.Message):
    __slots__ = ("manifest_digest", "run_id")
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    manifest_digest: str
    run_id: str
    def __init__(self, manifest_digest: _Optional[str] = ..., run_id: _Optional[str] = ...) -> None: ...

class Action(_message.Message):
    __slots__ = ("kind", "target", "args", "max_tokens", "method", "path", "args_json", "probe", "input_bytes")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    INPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    target: str
    args: _struct_pb2.Struct
    max_tokens: int
    method: str
    path: str
    args_json: bytes
    probe: bool
    input_bytes: int
    def __init__(self, kind: _Optional[str] = ..., target: _Optional[str] = ..., args: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., max_tokens: _Optional[int] = ..., method: _Optional[str] = ..., path: _Optional[str] = ..., args_json: _Optional[bytes] = ..., probe: _Optional[bool] = ..., input_bytes: _Optional[int] = ...) -> None: ...

class DecideRequest(_message.Message):
    __slots__ = ("run_id", "request_id", "action", "manifest_digest", "settlements")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SETTLEMENTS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    request_id: str
    action: Action
    manifest_digest: str
    settlements: _containers.RepeatedCompositeFieldContainer[ReportUsageRequest]
    def __init__(self, run_id: _Optional[str] = ..., request_id: _Optional[str] = ..., action: _Optional[_Union[Action, _Mapping]] = ..., manifest_digest: _Optional[str] = ..., settlements: _Optional[_Iterable[_Union[ReportUsageRequest, _Mapping]]] = ...) -> None: ...

class Reason(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class DecideResponse(_message.Message):
    __slots__ = ("allow", "reasons", "decision_id", "obligations", "reservation_id", "shadow", "would_allow", "settled")
    ALLOW_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    OBLIGATIONS_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    WOULD_ALLOW_FIELD_NUMBER: _ClassVar[int]
    SETTLED_FIELD_NUMBER: _ClassVar[int]
    allow: bool
    reasons: _containers.RepeatedCompositeFieldContainer[Reason]
    decision_id: str
    obligations: _struct_pb2.Struct
    reservation_id: str
    shadow: bool
    would_allow: bool
    settled: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, allow: _Optional[bool] = ..., reasons: _Optional[_Iterable[_Union[Reason, _Mapping]]] = ..., decision_id: _Optional[str] = ..., obligations: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., reservation_id: _Optional[str] = ..., shadow: _Optional[bool] = ..., would_allow: _Optional[bool] = ..., settled: _Optional[_Iterable[bool]] = ...) -> None: ...

class ReportUsageRequest(_message.Message):
    __slots__ = ("reservation_id", "tokens", "usd_micros", "manifest_digest")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    USD_MICROS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    tokens: int
    usd_micros: int
    manifest_digest: str
    def __init__(self, reservation_id: _Optional[str] = ..., tokens: _Optional[int] = ..., usd_micros: _Optional[int] = ..., manifest_digest: _Optional[str] = ...) -> None: ...

class ReportUsageResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReportUsageBatchRequest(_message.Message):
    __slots__ = ("reports", "confirm_by_decision")
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    CONFIRM_BY_DECISION_FIELD_NUMBER: _ClassVar[int]
    reports: _containers.RepeatedCompositeFieldContainer[ReportUsageRequest]
    confirm_by_decision: bool
    def __init__(self, reports: _Optional[_Iterable[_Union[ReportUsageRequest, _Mapping]]] = ..., confirm_by_decision: _Optional[bool] = ...) -> None: ...

class ReportUsageBatchResponse(_message.Message):
    __slots__ = ("settled", "pending")
    SETTLED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    settled: _containers.RepeatedScalarFieldContainer[bool]
    pending: bool
    def __init__(self, settled: _Optional[_Iterable[bool]] = ..., pending: _Optional[bool] = ...) -> None: ...

class StartRunRequest(_message.Message):
    __slots__ = ("manifest_digest", "run_key", "narrower")
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    RUN_KEY_FIELD_NUMBER: _ClassVar[int]
    NARROWER_FIELD_NUMBER: _ClassVar[int]
    manifest_digest: str
    run_key: str
    narrower: bytes
    def __init__(self, manifest_digest: _Optional[str] = ..., run_key: _Optional[str] = ..., narrower: _Optional[bytes] = ...) -> None: ...

class StartRunResponse(_message.Message):
    __slots__ = ("run_id", "started")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    started: bool
    def __init__(self, run_id: _Optional[str] = ..., started: _Optional[bool] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id", "manifest_digest")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    manifest_digest: str
    def __init__(self, run_id: _Optional[str] = ..., manifest_digest: _Optional[str] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("tokens", "usd_micros", "tool_calls", "requests")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    USD_MICROS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    usd_micros: int
    tool_calls: int
    requests: int
    def __init__(self, tokens: _Optional[int] = ..., usd_micros: _Optional[int] = ..., tool_calls: _Optional[int] = ..., requests: _Optional[int] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("step", "spent", "remaining", "status", "completed_steps", "manifest_digest", "reserved", "run_key", "effective_digest", "fleet")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SPENT_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_STEPS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    RUN_KEY_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    FLEET_FIELD_NUMBER: _ClassVar[int]
    step: str
    spent: Budget
    remaining: Budget
    status: str
    completed_steps: _containers.RepeatedScalarFieldContainer[str]
    manifest_digest: str
    reserved: Budget
    run_key: str
    effective_digest: str
    fleet: Fleet
    def __init__(self, step: _Optional[str] = ..., spent: _Optional[_Union[Budget, _Mapping]] = ..., remaining: _Optional[_Union[Budget, _Mapping]] = ..., status: _Optional[str] = ..., completed_steps: _Optional[_Iterable[str]] = ..., manifest_digest: _Optional[str] = ..., reserved: _Optional[_Union[Budget, _Mapping]] = ..., run_key: _Optional[str] = ..., effective_digest: _Optional[str] = ..., fleet: _Optional[_Union[Fleet, _Mapping]] = ...) -> None: ...

class Fleet(_message.Message):
    __slots__ = ("spent", "reserved", "remaining", "open", "runs", "max_runs")
    SPENT_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNS_FIELD_NUMBER: _ClassVar[int]
    spent: Budget
    reserved: Budget
    remaining: Budget
    open: _containers.RepeatedScalarFieldContainer[str]
    runs: int
    max_runs: int
    def __init__(self, spent: _Optional[_Union[Budget, _Mapping]] = ..., reserved: _Optional[_Union[Budget, _Mapping]] = ..., remaining: _Optional[_Union[Budget, _Mapping]] = ..., open: _Optional[_Iterable[str]] = ..., runs: _Optional[int] = ..., max_runs: _Optional[int] = ...) -> None: ...

class RecordRefusalRequest(_message.Message):
    __slots__ = ("run_id", "request_id", "route", "reason", "message", "manifest_digest")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    request_id: str
    route: str
    reason: str
    message: str
    manifest_digest: str
    def __init__(self, run_id: _Optional[str] = ..., request_id: _Optional[str] = ..., route: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., manifest_digest: _Optional[str] = ...) -> None: ...

class RecordRefusalResponse(_message.Message):
    __slots__ = ("decision_id",)
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    def __init__(self, decision_id: _Optional[str] = ...) -> None: ...
