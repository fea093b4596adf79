"""The tamper-evident decision log: typed records, hash-chained JSON lines, signed
checkpoints, verifier."""

from pdp.decisionlog.head import LogHead, read_head
from pdp.decisionlog.records import (
    CheckpointRecord,
    DecisionRecord,
    Record,
    RecordInvalid,
    RegistrationRecord,
    RegistrationRefusedRecord,
    RunStartRecord,
    SettlementRecord,
    StepChange,
    WritableRecord,
    parse_record,
)
from pdp.decisionlog.segments import LogPosition
from pdp.decisionlog.verify import (
    Logged,
    LogInvalid,
    LogReader,
    LogReport,
    VerifiedLog,
    read_verified_log,
    verify_log,
)
from pdp.decisionlog.writer import DecisionLog, MaskRule, Queued

__all__ = [
    "CheckpointRecord",
    "DecisionLog",
    "DecisionRecord",
    "LogHead",
    "LogInvalid",
    "LogPosition",
    "LogReader",
    "LogReport",
    "Logged",
    "MaskRule",
    "Queued",
    "Record",
    "RecordInvalid",
    "RegistrationRecord",
    "RegistrationRefusedRecord",
    "RunStartRecord",
    "SettlementRecord",
    "StepChange",
    "VerifiedLog",
    "WritableRecord",
    "parse_record",
    "read_head",
    "read_verified_log",
    "verify_log",
]
