"""The fake OpenAI API alone, as its own process, for bench_pep.py: ``fake_upstream.py PORT``.

``tests.fakes.serve`` also runs three MCP servers whose uvicorn loops tick ten times a
second, about 7 ms of CPU a second while idle. The benchmark charges each process's CPU to
the batch that runs meanwhile, so the upstream it measures must cost nothing when idle.
"""

from __future__ import annotations

import sys

from aiohttp import web

from tests.fakes.openai_api import openai_app
from tests.fakes.recorder import Recorder


def main() -> None:
    web.run_app(
        openai_app(Recorder()), host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None
    )


if __name__ == "__main__":
    main()
