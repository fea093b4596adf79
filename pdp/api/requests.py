"""Whether a protocol request can be judged as it is sent, before it is mapped to an action.

A request some server could read otherwise than the decider does (a method override, a
header spelled twice, an escape that decodes to another path, JSON with duplicate keys) is
refused here: the PEP forwards the agent's bytes, so what is judged must be what they say.
Every function is pure and raises ``MappingError`` (reason ``bad_request``).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

from pdp.api.reasons import MappingError

__all__ = [
    "OVERRIDE_HEADERS",
    "check_http_path",
    "check_resource_uri",
    "exact_value_problem",
    "parse_json_object",
    "unsafe_request",
]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        # Parsers disagree on which duplicate wins; the decider and the upstream must not.
        raise MappingError("duplicate keys in the request body")
    if len(document) > 1 and len(document) != len({key.casefold() for key in document}):
        # Go's encoding/json (Ollama, Go gateways) matches keys case-insensitively, with
        # Unicode folding: "Model" or "max_to\u212aens" would be its "model", "max_tokens".
        raise MappingError("keys that differ only in case in the request body")
    return document


def _no_constant(name: str) -> Any:
    raise MappingError(f"{name} is not JSON")


# Made once: ``json.loads`` with hooks builds a decoder (and its scanner) on every call.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object; ``MappingError`` for anything else.

    UTF-8 only: ``json.loads`` would sniff UTF-16 or UTF-32 from bytes, which the
    upstream need not do, and a byte-order mark is refused likewise.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MappingError("the request body is not UTF-8") from exc
    try:
        value = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, MappingError):
            raise
        raise MappingError("the request body is not JSON") from exc
    if not isinstance(value, dict):
        raise MappingError("the request body is not a JSON object")
    return value


# Headers that make some servers do another method or path than the one decided.
OVERRIDE_HEADERS = frozenset(
    {
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-url",
        "x-original-uri",
        "x-rewrite-url",
        "x-original-method",
        "x-forwarded-method",
        "x-forwarded-uri",
        "x-forwarded-path",
        "x-forwarded-prefix",
    }
)
# Headers whose meaning the sidecar relies on (framing, hop-by-hop, its own): spelled with
# an underscore, a CGI-style server reads them as these, after the sidecar judged them not.
_MEANINGFUL_HEADERS = frozenset(
    {
        "connection",
        "content-encoding",
        "content-length",
        "content-type",
        "host",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def _header_key(name: str) -> str:
    """A header name as CGI-style servers read it: case-folded, ``_`` the same as ``-``."""
    return name.strip().lower().replace("_", "-")


# Query keys that some frameworks read as the method (Laravel, Express method-override).
_OVERRIDE_QUERY_KEYS = frozenset(_header_key(k) for k in ("_method", *OVERRIDE_HEADERS))


_CHARSET = re.compile(r";\s*charset\s*=\s*\"?([^\";\s]*)", re.IGNORECASE)
_UTF8 = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})  # ASCII bodies are UTF-8 too


def _header_problem(
    headers: Iterable[tuple[str, str]], body_judged: bool
) -> tuple[str | None, list[str]]:
    """What makes the headers unsafe (or None), and the values of their Content-Type
    headers under any spelling: one pass over them."""
    spellings: dict[str, str] = {}
    content_types: list[str] = []
    for name, value in headers:
        key = _header_key(name)
        if key in OVERRIDE_HEADERS:
            return "method or URL override headers are refused", content_types
        # Every Content-Encoding header counts: a second one must not hide behind the first.
        if key == "content-encoding" and value.strip().lower() != "identity":
            return "compressed request bodies are refused", content_types
        if key == "content-type":
            content_types.append(value)
            # The body is judged as UTF-8; a server decoding it by the charset it names
            # (UTF-7, Shift_JIS...) would read another request.
            if body_judged and any(c.lower() not in _UTF8 for c in _CHARSET.findall(value)):
                return "a request body in another charset than UTF-8 is refused", content_types
        if "_" in name and (key in _MEANINGFUL_HEADERS or key.startswith(("x-abc-", "mcp-"))):
            # Mcp-* route MCP requests (Mcp-Method, Mcp-Name, Mcp-Param-*): spelled
            # Mcp_Name, one a proxy reads as Mcp-Name would escape their check.
            return (
                "a framing, routing or sidecar header spelled with an underscore is refused",
                content_types,
            )
        if spellings.setdefault(key, name.lower()) != name.lower():
            # X-Api-Key and X_Api_Key: which one an upstream reads is its choice, not ours.
            return "one header sent under two spellings is refused", content_types
    return None, content_types


def _query_problem(raw_query: str) -> str | None:
    if not raw_query:
        return None
    for pair in re.split(r"[&;]", raw_query):
        raw_key = pair.split("=", 1)[0].replace("+", " ")
        key = unquote_to_bytes(raw_key).decode("utf-8", "replace")
        if _header_key(key) in _OVERRIDE_QUERY_KEYS:
            return "method override query parameters are refused"
    return None


def unsafe_request(
    method: str,
    raw_path: str,
    headers: Iterable[tuple[str, str]],
    *,
    model_route: bool,
    raw_query: str = "",
    body_judged: bool = True,
) -> str | None:
    """Why a request cannot be judged faithfully (then it is refused), or None.

    ``headers`` are (name, value) pairs as received; ``raw_path`` and ``raw_query`` are the
    path and query string as sent; ``body_judged`` is False where the body passes unread.
    """
    problem, types = _header_problem(headers, body_judged)
    problem = problem or _query_problem(raw_query)
    if problem is not None:
        return problem
    if model_route:
        if method != "POST":
            return f"{method} on a model endpoint is not governed"
        if "%" in raw_path:
            return "percent-encoded model endpoint paths are refused"
        if len(types) != 1 or types[0].split(";")[0].strip().lower() != "application/json":
            # The body is judged as JSON; an upstream parsing it as a form would read
            # fields the policy never saw.
            return "a model request is one body of Content-Type application/json"
        if raw_query and not _MODEL_QUERY.fullmatch(raw_query):
            # The official SDKs send none (Anthropic's beta=true aside); a gateway upstream
            # may read a model or a cap from it.
            return "a query string on a model endpoint is refused"
    return None


_MODEL_QUERY = re.compile(r"beta=true|api-version=[0-9A-Za-z.-]{1,32}")


_PRINTABLE_PATH = re.compile(r"/[\x21-\x7e]{0,2047}")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
# Characters that never need an escape (RFC 3986 unreserved), and the ones the policy reads
# a path by: escaped, a decoding upstream sees one the policy was not shown.
_NEVER_ESCAPED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/\\%")
_DOT_SEGMENTS = frozenset({".", ".."})


def check_http_path(path: str) -> str:
    """``path`` (the raw path as sent, which is forwarded byte for byte) if no upstream can
    read it as another path than the policy is shown; ``MappingError`` otherwise.

    Dot segments and backslashes written out are left to the policy, which sees them as they
    are. What it cannot see is what escapes decode to, so:

    1. printable ASCII only, starting with ``/`` (what the PDP takes);
    2. every ``%`` starts an escape of two hex digits;
    3. no escape of a character that never needs one (unreserved, ``/``, ``\\``, ``%``);
    4. the escaped bytes are valid, shortest-form UTF-8 (``%c0%ae``, ``%e0%80%ae`` and
       ``%f0%80%80%ae`` are an overlong ``.``), with no control or format characters;
    5. a segment with escapes is no dot segment (``..%3b`` is ``..;``), and holds no slash,
       backslash or percent sign, once decoded and once NFKC-normalised (``%ef%bc%8e`` is a
       full-width dot, ``.`` to a server that normalises).
    """
    # 1.
    if not _PRINTABLE_PATH.fullmatch(path):
        raise MappingError("HTTP path must start with / and hold printable ASCII only")
    # 2.
    if "%" in _ESCAPE.sub("", path):
        raise MappingError("a percent sign in the path starts no escape")
    # 3.
    if any(chr(int(m.group(1), 16)) in _NEVER_ESCAPED for m in _ESCAPE.finditer(path)):
        raise MappingError("the path escapes a character that needs no escape")
    for segment in path.split("/"):
        if "%" not in segment:
            continue
        # 4.
        try:
            decoded = unquote_to_bytes(segment).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MappingError("the path's escapes are not shortest-form UTF-8") from exc
        if any(unicodedata.category(c) in ("Cc", "Cf") for c in decoded):
            raise MappingError("the path escapes a control character")
        # 5.
        for form in (decoded, unicodedata.normalize("NFKC", decoded)):
            if form.split(";", 1)[0] in _DOT_SEGMENTS or any(c in form for c in "/\\%"):
                raise MappingError("an escaped path segment decodes to another path")
    return path


_SEPARATORS = re.compile(r"[/\\]")


def _dot_segment(text: str) -> bool:
    return any(part.split(";", 1)[0] in _DOT_SEGMENTS for part in _SEPARATORS.split(text))


def check_resource_uri(uri: str) -> str:
    """``uri`` if no server can resolve it outside a prefix it starts with; ``MappingError``
    otherwise. A grant is a URI prefix: ``file:///docs/../etc/passwd`` starts with
    ``file:///docs/`` and is not under it.

    So before any query or fragment, no dot segment between ``/`` or ``\\``: written out,
    or once a segment's escapes are decoded (up to three times, as a server may decode more
    than once), also NFKC-normalised; and every escape valid, shortest-form UTF-8
    (``%c0%ae`` is an overlong ``.``). Other escapes (``%2F`` inside a name, ``%25``) stay
    the server's business: they move nothing outside the prefix.
    """
    for segment in _SEPARATORS.split(re.split(r"[?#]", uri, maxsplit=1)[0]):
        form = segment
        for _ in range(3):
            try:
                decoded = unquote_to_bytes(form).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MappingError("a resource URI's escapes are not shortest-form UTF-8") from exc
            if _dot_segment(decoded) or _dot_segment(unicodedata.normalize("NFKC", decoded)):
                raise MappingError("a resource URI that could resolve outside its prefix")
            if decoded == form:
                break
            form = decoded
    return uri


def exact_value_problem(value: Any) -> str | None:
    """Why a JSON value cannot be judged and logged exactly as sent, or None.

    The engine and the decision log take Unicode text: a lone surrogate could be neither
    judged nor logged as sent (numbers, fractions included, are both).
    Iterative, so that nesting as deep as a JSON parser allows cannot overflow the stack.
    """
    pending = [value]
    while pending:
        item = pending.pop()
        texts = [item] if isinstance(item, str) else list(item) if isinstance(item, dict) else []
        for text in texts:
            try:
                text.encode("utf-8")
            except (UnicodeEncodeError, AttributeError):
                return "strings must be valid Unicode (no lone surrogates)"
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return None
