"""pep/reading.py: a body decoded as the client decodes it, or ``Unreadable``."""

from __future__ import annotations

import gzip
import zlib

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from pep.reading import BodyDecoder, Unreadable, media_type

TEXT = 'data: {"tools":[]}\n\n'


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def decode(body: bytes, *pairs: tuple[str, str], chunk: int = 3) -> str:
    decoder = BodyDecoder.for_response(headers(*pairs))
    parts = [text for i in range(0, len(body), chunk) for text in decoder.feed(body[i : i + chunk])]
    return "".join(parts) + decoder.finish()


def raw_deflate(data: bytes) -> bytes:
    squeezer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return squeezer.compress(data) + squeezer.flush()


@pytest.mark.parametrize(
    ("body", "pairs"),
    [
        (TEXT.encode(), ()),
        (TEXT.encode(), (("Content-Type", "text/event-stream"),)),
        (b"\xef\xbb\xbf" + TEXT.encode(), ()),
        (TEXT.encode("utf-16-le"), (("Content-Type", "text/event-stream; charset=utf-16le"),)),
        (TEXT.encode("utf-16"), (("Content-Type", 'text/event-stream; charset="UTF-16"'),)),
        (TEXT.encode("latin-1"), (("Content-Type", "text/event-stream; charset=latin-1"),)),
        (gzip.compress(TEXT.encode()), (("Content-Encoding", "gzip"),)),
        (gzip.compress(TEXT.encode()), (("Content-Encoding", "x-gzip"),)),
        (zlib.compress(TEXT.encode()), (("Content-Encoding", "deflate"),)),
        (raw_deflate(TEXT.encode()), (("Content-Encoding", "Deflate"),)),
        (
            gzip.compress(zlib.compress(TEXT.encode())),
            (("Content-Encoding", "deflate"), ("Content-Encoding", "gzip")),
        ),
        (gzip.compress(TEXT.encode()), (("Content-Encoding", "identity, gzip"),)),
    ],
    ids=[
        "plain",
        "sse-no-charset",
        "bom-dropped",
        "utf-16le",
        "utf-16-with-bom-quoted",
        "latin-1",
        "gzip",
        "x-gzip",
        "deflate-zlib",
        "deflate-raw",
        "stacked-headers",
        "identity-ignored",
    ],
)
def test_decoded_as_the_client_decodes(body: bytes, pairs: tuple[tuple[str, str], ...]) -> None:
    assert decode(body, *pairs) == TEXT


@pytest.mark.parametrize(
    ("body", "pairs"),
    [
        (TEXT.encode(), (("Content-Encoding", "br"),)),
        (TEXT.encode(), (("Content-Encoding", "zstd"),)),
        (TEXT.encode(), (("Content-Encoding", "gzip"),)),
        (gzip.compress(TEXT.encode())[:-6], (("Content-Encoding", "gzip"),)),
        (gzip.compress(TEXT.encode()) + b"tail", (("Content-Encoding", "gzip"),)),
        (TEXT.encode(), (("Content-Encoding", "gzip, gzip, gzip, gzip, gzip"),)),
        (TEXT.encode(), (("Content-Type", "text/event-stream; charset=x-no-such"),)),
        (TEXT.encode(), (("Content-Type", "text/event-stream; charset=rot13"),)),
        (b"data: \xff\n\n", ()),
        (b"data: \xc3", ()),
        (TEXT.encode(), (("Content-Type", "text/event-stream"), ("Content-Type", "text/plain"))),
    ],
    ids=[
        "brotli",
        "zstd",
        "gzip-declared-not-applied",
        "gzip-truncated",
        "bytes-after-gzip",
        "too-many-codings",
        "unknown-charset",
        "not-a-text-charset",
        "invalid-utf-8",
        "utf-8-cut-short",
        "two-content-types",
    ],
)
def test_what_cannot_be_decoded_exactly_is_unreadable(
    body: bytes, pairs: tuple[tuple[str, str], ...]
) -> None:
    with pytest.raises(Unreadable):
        decode(body, *pairs)


def test_a_small_body_cannot_inflate_in_one_piece() -> None:
    decoder = BodyDecoder.for_response(headers(("Content-Encoding", "gzip")))
    pieces = list(decoder.feed(gzip.compress(b"a" * 1_000_000)))
    assert max(len(piece) for piece in pieces) <= 64 * 1024
    assert sum(map(len, pieces)) + len(decoder.finish()) == 1_000_000


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Text/Event-Stream; charset=UTF-16LE", ("text/event-stream", "utf-16le")),
        ("application/json", ("application/json", "")),
        ('application/json; charset="utf-8"', ("application/json", "utf-8")),
    ],
    ids=["cased", "no-charset", "quoted"],
)
def test_media_type_and_charset_read_as_httpx_reads_them(
    value: str, expected: tuple[str, str]
) -> None:
    assert media_type(headers(("Content-Type", value))) == expected
