"""abc-pdp with a port taken: one line, exit 1, and nothing left behind (no state, no key)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.harness import Signer, pdp_flags, start_up_error


@pytest.mark.parametrize("flag", ["--listen", "--health", "--metrics", "--http"])
def test_a_taken_port_leaves_no_state_behind(signer: Signer, tmp_path: Path, flag: str) -> None:
    state = tmp_path / "state"
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = f"127.0.0.1:{held.getsockname()[1]}"
        flags = pdp_flags(signer.trust, state, listen=taken if flag == "--listen" else None)
        extra = [] if flag == "--listen" else [flag, taken]
        stderr = start_up_error("abc-pdp", *flags, *extra)
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert taken in stderr
    assert not state.exists(), sorted(p.name for p in state.rglob("*"))
