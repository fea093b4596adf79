"""Local fake upstreams speaking the real OpenAI, Anthropic, HTTP/JSON and MCP wire formats.

They bind to 127.0.0.1 only and record what they receive, so tests can check what the sidecar
actually forwarded. Start them all with `tests.fakes.serve.FakeUpstreams`; nothing is imported
here so that `python -m tests.fakes.serve` runs its module exactly once.
"""
