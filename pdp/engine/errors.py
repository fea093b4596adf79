"""Turn rego-cpp's S-expression error dumps into ``file:line: message`` lines."""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["summarize_rego_error"]

_ERROR = re.compile(r"\(error \d+:([^|\s)]+)\|(\d+)\|\d+\s*\(errormsg \d+:([^)]*)\)")


def summarize_rego_error(text: str, modules: Mapping[str, str]) -> str:
    """One line per error, positions turned from byte offsets into line numbers."""
    lines = []
    for name, offset, message in _ERROR.findall(text):
        source = modules.get(name)
        line = source.encode()[: int(offset)].count(b"\n") + 1 if source is not None else "?"
        lines.append(f"{name}:{line}: {message.strip()}")
    return "; ".join(lines) if lines else text.strip().splitlines()[0][:300]
