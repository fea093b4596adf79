"""What an agent meets first through the sidecar: the SDKs' base URLs, the model list,
a route with no upstream, and metrics without `_created` series (PEP and PDP)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx2 as httpx
import openai
import pytest

from tests.fakes.serve import FakeUpstreams
from tests.harness import API_KEY, INTENT, PdpProcess, PepProcess, Signer, sample, start_pep


@pytest.fixture(scope="module")
def pep(pdp: PdpProcess, signer: Signer, fakes: FakeUpstreams) -> Iterator[PepProcess]:
    envelope = signer.dir / "first-contact.json"
    text = INTENT.read_text().replace("acme/support-bot", "acme/first-contact")
    envelope.write_bytes(signer.freeze(text, "first-contact"))
    # Both model upstreams in the form their SDKs document for base_url, /v1 included.
    upstreams = {"openai": fakes.openai_url, "anthropic": fakes.anthropic_url + "/v1"}
    assert upstreams["openai"].endswith("/v1")
    process = start_pep(pdp.address, upstreams, signer.dir, "--manifest", str(envelope))
    yield process
    process.stop()


def test_sdk_base_url_form_reaches_the_right_path(pep: PepProcess, fakes: FakeUpstreams) -> None:
    client = openai.OpenAI(base_url=f"{pep.url}/openai/v1", api_key=API_KEY, max_retries=0)
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content.startswith("Hello from the fake OpenAI")
    assert fakes.recorder.last("openai").path == "/v1/chat/completions"
    claude = anthropic.Anthropic(base_url=f"{pep.url}/anthropic", api_key=API_KEY, max_retries=0)
    claude.messages.create(
        model="claude-haiku-4-5",
        max_tokens=10,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-abc-step": "answer"},  # the intent grants Claude in step answer
    )
    assert fakes.recorder.last("anthropic").path == "/v1/messages"


def test_models_list_is_what_the_manifest_grants(pep: PepProcess, fakes: FakeUpstreams) -> None:
    before = len(fakes.recorder)
    client = openai.OpenAI(base_url=f"{pep.url}/openai/v1", api_key=API_KEY, max_retries=0)
    assert [model.id for model in client.models.list()] == ["gpt-4o-mini"]
    claude = anthropic.Anthropic(base_url=f"{pep.url}/anthropic", api_key=API_KEY, max_retries=0)
    assert [model.id for model in claude.models.list()] == ["claude-haiku-4-5"]
    assert len(fakes.recorder) == before, "answered by the sidecar, nothing sent upstream"
    assert sample(pep.metrics(), "abc_pep_requests_total", route="openai", decision="pass") >= 1


@pytest.mark.parametrize(
    ("path", "upstream"),
    [("/http/nowhere/x", "http:nowhere"), ("/mcp/nokb", "mcp:nokb")],
)
def test_a_route_without_upstream_is_404_naming_the_flag(
    pep: PepProcess, path: str, upstream: str
) -> None:
    reply = httpx.post(f"{pep.url}{path}", json={})
    assert reply.status_code == 404
    assert reply.headers["x-abc-reason"] == "bad_request"
    assert f"--upstream {upstream}=URL" in reply.text


def test_a_model_route_without_upstream_is_the_sdks_not_found_error(
    pdp: PdpProcess, fakes: FakeUpstreams, demo_envelope: bytes, tmp_path: Path
) -> None:
    envelope = tmp_path / "envelope.json"
    envelope.write_bytes(demo_envelope)
    process = start_pep(
        pdp.address, {"openai": fakes.openai_url}, tmp_path, "--manifest", str(envelope)
    )
    try:
        claude = anthropic.Anthropic(
            base_url=f"{process.url}/anthropic", api_key=API_KEY, max_retries=0
        )
        hello = [{"role": "user", "content": "hi"}]
        with pytest.raises(anthropic.NotFoundError) as refused:
            claude.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=hello)
        body = refused.value.body
        assert isinstance(body, dict) and body["error"]["type"] == "not_found_error"
        assert "--upstream anthropic=URL" in body["error"]["message"]
        assert refused.value.response.headers["x-abc-reason"] == "bad_request"
    finally:
        process.stop()


def test_no_created_series(pep: PepProcess, pdp: PdpProcess) -> None:
    for text in (pep.metrics(), pdp.metrics()):
        assert "abc_" in text
        assert "_created" not in text


def test_unbound_sidecar_still_refuses_the_model_list(
    pdp: PdpProcess, fakes: FakeUpstreams, tmp_path: Path
) -> None:
    # Without --manifest the sidecar knows no grants: the listing is refused, never forwarded.
    process = start_pep(pdp.address, {"openai": fakes.openai_url}, tmp_path)
    try:
        before = len(fakes.recorder)
        reply = httpx.get(f"{process.url}/openai/v1/models", headers={"x-abc-run": "run_x"})
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["code"] == "bad_request"
        assert len(fakes.recorder) == before
    finally:
        process.stop()
