"""Write values into a JSON object's top-level fields, every other byte as the agent sent it.

Re-serialising a parsed body changes what the upstream reads and bills (``1e9`` comes back as
``1000000000.0``: an 80 KB body grew to 260 KB past its reservation). So a cap is spliced
into the original text instead, and the body grows by at most ``CAP_GROWTH`` bytes, which the
reservation includes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from pdp.api.mapping import CAP_GROWTH, MAX_TOKENS

__all__ = ["top_level_spans", "write_fields"]

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _skip(text: str, index: int) -> int:
    end = _WHITESPACE.match(text, index)
    assert end is not None  # the pattern matches the empty string
    return end.end()


def _expect(text: str, index: int, char: str) -> int:
    if index >= len(text) or text[index] != char:
        raise ValueError(f"expected {char!r} at {index}")
    return _skip(text, index + 1)


def top_level_spans(text: str) -> dict[str, tuple[int, int]]:
    """Each top-level key of the JSON object ``text`` and its value's span [start, end).

    ``text`` was parsed strictly already (no duplicate keys); ``ValueError`` if not an object.
    """
    spans: dict[str, tuple[int, int]] = {}
    index = _expect(text, _skip(text, 0), "{")
    if text[index : index + 1] == "}":
        return spans
    while True:
        if text[index : index + 1] != '"':
            raise ValueError(f"expected a key at {index}")
        key, index = json.decoder.scanstring(text, index + 1)  # type: ignore[attr-defined]
        index = _expect(text, _skip(text, index), ":")
        _, end = _DECODER.raw_decode(text, index)
        spans[key] = (index, end)
        index = _skip(text, end)
        if text[index : index + 1] == "}":
            return spans
        index = _expect(text, index, ",")


def write_fields(raw: bytes, values: Mapping[str, int]) -> bytes:
    """``raw`` (a UTF-8 JSON object) with each of ``values`` written over the field's value
    where the object has the field, or inserted first where it has not."""
    if any(not 0 <= value <= MAX_TOKENS for value in values.values()):
        raise ValueError("only token counts are spliced")
    text = raw.decode("utf-8")
    spans = top_level_spans(text)
    present = sorted(((spans[k], v) for k, v in values.items() if k in spans), reverse=True)
    for (start, end), value in present:  # from the end, so earlier spans stay where they are
        text = f"{text[:start]}{value}{text[end:]}"
    missing = [f"{json.dumps(k)}:{v}" for k, v in values.items() if k not in spans]
    if missing:
        brace = _skip(text, 0) + 1
        inserted = ",".join(missing) + ("," if spans else "")
        text = f"{text[:brace]}{inserted}{text[brace:]}"
    written = text.encode("utf-8")
    if len(written) > len(raw) + CAP_GROWTH:
        raise ValueError("a splice grew the body past CAP_GROWTH")
    return written
