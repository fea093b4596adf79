"""Property tests: every single-byte change and every re-encoding of a payload is refused."""

from __future__ import annotations

import base64
import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdp.errors import AbcError
from pdp.manifest.canonical import canonical_bytes
from pdp.manifest.verify import VerificationPolicy, verify_envelope
from tests.factories import NOW, envelope_from_payload, manifest_document, trust_entry, trust_store

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
STORE = trust_store(trust_entry(KEY))
DOCUMENT = manifest_document()
ENVELOPE = envelope_from_payload(canonical_bytes(DOCUMENT), KEY)
settings.register_profile("abc", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("abc")


def test_the_untouched_envelope_verifies() -> None:
    assert (
        verify_envelope(ENVELOPE, STORE, NOW, VerificationPolicy.OFFLINE).manifest.metadata.version
        == 7
    )


@settings(max_examples=400)
@given(position=st.integers(0, len(ENVELOPE) - 1), value=st.integers(0, 255))
def test_any_single_byte_change_is_refused(position: int, value: int) -> None:
    if ENVELOPE[position] == value:
        value = (value + 1) % 256
    tampered = ENVELOPE[:position] + bytes([value]) + ENVELOPE[position + 1 :]
    try:
        verify_envelope(tampered, STORE, NOW, VerificationPolicy.OFFLINE)
    except AbcError:
        return
    raise AssertionError(f"byte {position} changed to {value} still verified")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=12,
)


@given(json_values)
def test_canonicalization_is_idempotent(value: object) -> None:
    once = canonical_bytes(value)
    assert canonical_bytes(json.loads(once)) == once


@given(
    indent=st.none() | st.integers(0, 3),
    sort_keys=st.booleans(),
    ensure_ascii=st.booleans(),
    separators=st.sampled_from([(",", ":"), (", ", ": "), (",", ": ")]),
)
def test_any_reencoding_of_the_payload_is_refused(
    indent: int | None, sort_keys: bool, ensure_ascii: bool, separators: tuple[str, str]
) -> None:
    document = manifest_document(goal="résumé ✓")  # non-ASCII, so ensure_ascii changes bytes
    canonical = canonical_bytes(document)
    reencoded = json.dumps(
        document,
        indent=indent,
        sort_keys=sort_keys,
        ensure_ascii=ensure_ascii,
        separators=separators,
    ).encode()
    if reencoded == canonical:
        return  # the one canonical spelling: nothing to refuse
    # Signed by the trusted key, so only the canonical-form rule stands in the way.
    try:
        verify_envelope(
            envelope_from_payload(reencoded, KEY), STORE, NOW, VerificationPolicy.OFFLINE
        )
    except AbcError:
        return
    raise AssertionError("a re-encoded payload verified")


@given(st.binary(min_size=1, max_size=64))
def test_random_payload_bytes_are_refused_even_when_signed(payload: bytes) -> None:
    try:
        verify_envelope(envelope_from_payload(payload, KEY), STORE, NOW, VerificationPolicy.OFFLINE)
    except AbcError:
        return
    raise AssertionError(f"payload {base64.b64encode(payload)!r} verified")


plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(alphabet=st.characters(max_codepoint=127), max_size=6), children, max_size=4
        )
    ),
    max_leaves=20,
)


@settings(max_examples=500)
@given(plain_values)
def test_the_fast_canonical_path_is_rfc8785_byte_for_byte(value: object) -> None:
    import rfc8785

    assert canonical_bytes(value) == rfc8785.dumps(value)


def test_non_ascii_keys_take_the_reference_path() -> None:
    import rfc8785

    # Code-point and UTF-16 orders differ here: U+FF61 sorts before U+1F600 in UTF-16.
    document = {"\uff61": 1, "\U0001f600": 2}
    assert canonical_bytes(document) == rfc8785.dumps(document)
