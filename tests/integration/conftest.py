from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.serve import FakeUpstreams
from tests.harness import (
    API_KEY,
    INTENT,
    PdpProcess,
    RedisProcess,
    Signer,
    start_pdp,
    start_redis,
)


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    return Signer(tmp_path_factory.mktemp("signer"))


@pytest.fixture(scope="module")
def demo_envelope(signer: Signer) -> bytes:
    return signer.freeze(INTENT.read_text(), "demo")


@pytest.fixture(scope="module")
def pdp(signer: Signer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PdpProcess]:
    process = start_pdp(signer, Path(tmp_path_factory.mktemp("pdp-state")))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = start_redis(Path(tmp_path_factory.mktemp("redis")))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fakes() -> Iterator[FakeUpstreams]:
    """Every fake upstream, on loopback, one set per test module."""
    with FakeUpstreams(openai_api_key=API_KEY) as upstreams:
        yield upstreams
