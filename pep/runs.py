"""Run keys to run ids: each task id an agent names (``x-abc-run-key``) is a run of the
sidecar's grant, started at the PDP on first sight and then remembered.

The PDP's StartRun is idempotent on (manifest, run key), so two first sights at once, or
a key forgotten here and seen again, give the same run. What is remembered is bounded
(least recently used keys are forgotten first), however many tasks the sidecar has seen.
"""

from __future__ import annotations

from collections import OrderedDict

from pep.pdp_client import PdpClient, Verdict

__all__ = ["REMEMBERED", "RunKeys"]

REMEMBERED = 10_000


class RunKeys:
    def __init__(
        self, pdp: PdpClient, grant: str, narrower: bytes = b"", remembered: int = REMEMBERED
    ) -> None:
        self._pdp = pdp
        self._grant = grant  # the manifest digest this sidecar registered
        self.narrower = narrower  # every run this sidecar starts is narrowed by it (--narrower)
        self._remembered = remembered
        self._runs: OrderedDict[str, str] = OrderedDict()

    async def run_id(self, run_key: str) -> str | Verdict:
        """The run id of ``run_key``, or the refusal to answer the request with."""
        run_id = self._runs.get(run_key)
        if run_id is not None:
            self._runs.move_to_end(run_key)
            return run_id
        started = await self._pdp.start_run(self._grant, run_key, self.narrower)
        if isinstance(started, str):
            self._runs[run_key] = started
            if len(self._runs) > self._remembered:
                self._runs.popitem(last=False)
        return started
