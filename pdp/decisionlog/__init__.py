"""The tamper-evident decision log: hash-chained JSON lines, signed checkpoints, verifier."""

from pdp.decisionlog.verify import LogInvalid, LogReport, VerifiedLog, read_verified_log, verify_log
from pdp.decisionlog.writer import DecisionLog, LogHead, MaskRule, read_head

__all__ = [
    "DecisionLog",
    "LogHead",
    "LogInvalid",
    "LogReport",
    "MaskRule",
    "VerifiedLog",
    "read_head",
    "read_verified_log",
    "verify_log",
]
