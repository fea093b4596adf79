"""Reading an upstream body as text exactly as a client will, or refusing it.

A client (httpx2 under the official MCP SDK, a browser's EventSource) undoes the content
codings, decodes by the declared charset and, like WHATWG decoders, drops a leading BOM
before it looks for a message. The sidecar does all of that first, strictly, and relays
only text it decoded itself, re-encoded as UTF-8 with no content coding: the client then
has nothing left to read differently. What it cannot decode that way raises
``Unreadable`` (a ``MappingError``: refused, never relayed).

Decoded:  content codings ``gzip``/``x-gzip`` and ``deflate`` (zlib-wrapped or raw, as
          httpx accepts it), stacked in any order; any text charset Python knows.
Refused:  any other coding (``br``, ``zstd``, ...), an unknown or non-text charset, bytes
          invalid in the charset (a client decoding with ``errors="replace"`` would still
          read around them), more than one ``Content-Type``.
"""

from __future__ import annotations

import codecs
import email.message
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from multidict import CIMultiDictProxy

from pdp.api.reasons import MappingError

__all__ = ["BodyDecoder", "Unreadable", "media_type"]

_PIECE = 64 * 1024  # inflate in bounded pieces: a small input must not inflate in one go
_MAX_CODINGS = 4
_BOM = "\ufeff"


class Unreadable(MappingError):
    """The body cannot be read exactly as the client would read it: refuse it."""


def media_type(headers: CIMultiDictProxy[str]) -> tuple[str, str]:
    """(media type in lower case, charset or "") of the one ``Content-Type``.

    The charset is parsed as httpx does (``email.message``), so both read the same one.
    """
    values = headers.getall("Content-Type", [])
    if len(values) > 1:
        raise Unreadable("more than one Content-Type")
    if not values:
        return "", ""
    message = email.message.Message()
    message["content-type"] = values[0]
    charset = message.get_content_charset(failobj=None) or ""
    return values[0].split(";")[0].strip().lower(), charset


class _Inflater:
    """One content coding undone, in bounded pieces."""

    def __init__(self, coding: str) -> None:
        self._raw_fallback = coding == "deflate"  # servers send "deflate" with or without zlib
        wbits = zlib.MAX_WBITS | 16 if coding != "deflate" else zlib.MAX_WBITS
        self._inflater = zlib.decompressobj(wbits)
        self._fed = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        if not data:
            return
        self._fed = True
        # Like httpx: "deflate" that is not zlib-wrapped is retried raw, on the first bytes
        # only, and only while nothing has come out (what went out cannot be taken back).
        retry_raw, self._raw_fallback = self._raw_fallback, False
        produced = False
        try:
            for piece in self._drain(data):
                produced = True
                yield piece
        except zlib.error as exc:
            if not retry_raw or produced:
                raise Unreadable(f"the content coding cannot be undone: {exc}") from exc
            self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            try:
                yield from self._drain(data)
            except zlib.error as again:
                raise Unreadable(f"the content coding cannot be undone: {again}") from again

    def _drain(self, data: bytes) -> Iterator[bytes]:
        piece = self._inflater.decompress(data, _PIECE)
        while piece:
            yield piece
            piece = self._inflater.decompress(self._inflater.unconsumed_tail, _PIECE)
        if self._inflater.eof and self._inflater.unused_data:
            raise Unreadable("bytes after the end of the compressed body")

    def finish(self) -> bytes:
        if not self._fed:
            return b""  # an empty body (a 202) carries no coded bytes at all
        if not self._inflater.eof:
            raise Unreadable("the compressed body is truncated")
        return self._inflater.flush()


@dataclass
class BodyDecoder:
    """Feed raw chunks, get text; ``finish()`` at the end of the body."""

    codings: list[_Inflater]
    text: codecs.IncrementalDecoder
    at_start: bool = True

    @classmethod
    def for_response(cls, headers: CIMultiDictProxy[str]) -> BodyDecoder:
        """The decoder for this response's codings and charset (UTF-8 when none is named,
        as for JSON and SSE); ``Unreadable`` if either is one the sidecar cannot undo."""
        codings = [
            token.strip().lower()
            for value in headers.getall("Content-Encoding", [])
            for token in value.split(",")
        ]
        codings = [coding for coding in codings if coding and coding != "identity"]
        if len(codings) > _MAX_CODINGS:
            raise Unreadable("too many content codings")
        for coding in codings:
            if coding not in ("gzip", "x-gzip", "deflate"):
                raise Unreadable(f"content coding {coding!r} is not one the sidecar decodes")
        _, charset = media_type(headers)
        try:
            info = codecs.lookup(charset or "utf-8")
        except LookupError as exc:
            raise Unreadable(f"unknown charset {charset!r}") from exc
        if not getattr(info, "_is_text_encoding", True):
            raise Unreadable(f"charset {charset!r} is not a text encoding")
        # Codings were applied in the order listed: undo them last first.
        inflaters = [_Inflater(coding) for coding in reversed(codings)]
        return cls(inflaters, info.incrementaldecoder(errors="strict"))

    def feed(self, chunk: bytes) -> Iterator[str]:
        for piece in self._undo(chunk, 0):
            yield self._decode(piece, final=False)

    def finish(self) -> str:
        tail = bytearray()
        for index, inflater in enumerate(self.codings):
            tail += b"".join(self._undo(inflater.finish(), index + 1))
        return self._decode(bytes(tail), final=True)

    def _undo(self, data: bytes, index: int) -> Iterator[bytes]:
        if index == len(self.codings):
            if data:
                yield data
            return
        for piece in self.codings[index].feed(data):
            yield from self._undo(piece, index + 1)

    def _decode(self, data: bytes, *, final: bool) -> str:
        try:
            text = self.text.decode(data, final)
        except UnicodeError as exc:
            raise Unreadable(f"the body is not valid in its charset: {exc}") from exc
        if self.at_start and text:
            self.at_start = False
            # WHATWG decoders drop one leading BOM; httpx keeps it. Dropped here, both agree.
            text = text.removeprefix(_BOM)
        return text
