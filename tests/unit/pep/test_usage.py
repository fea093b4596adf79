"""pep/usage.py: the tokens an upstream reports, streamed or not; None when unreadable."""

from __future__ import annotations

import pytest

from pep.usage import UsageReader


def _read(chunks: list[bytes], *, streaming: bool) -> int | None:
    reader = UsageReader(streaming)
    for chunk in chunks:
        reader.feed(chunk)
    return reader.tokens()


@pytest.mark.parametrize(
    ("body", "tokens"),
    [
        (b'{"usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}', 15),
        (b'{"usage": {"input_tokens": 7, "output_tokens": 3}}', 10),
        (b'{"usage": {"prompt_tokens": 4}}', 4),
        (b'{"response": {"usage": {"input_tokens": 2, "output_tokens": 8}}}', 10),
        (b'{"usage": {"prompt_tokens": true, "completion_tokens": 6}}', 6),
        (
            b'{"usage": {"input_tokens": 3, "cache_creation_input_tokens": 40000,'
            b' "cache_read_input_tokens": 90000, "output_tokens": 10}}',
            130013,
        ),
        (b'{"choices": []}', None),
        (b"not json", None),
        (b"", None),
    ],
    ids=[
        "openai-total",
        "anthropic-parts",
        "one-part",
        "nested-response",
        "bool-is-no-count",
        "anthropic-prompt-cache",
        "no-usage",
        "not-json",
        "empty",
    ],
)
def test_a_whole_body(body: bytes, tokens: int | None) -> None:
    # Split anywhere: the body is read whole before it is parsed.
    assert _read([body[:5], body[5:]], streaming=False) == tokens


def test_a_stream_takes_the_latest_usage_across_split_events() -> None:
    stream = (
        b'event: message_start\ndata: {"message": {"usage": {"input_tokens": 12, '
        b'"output_tokens": 1}}}\n\n'
        b'event: message_delta\ndata: {"usage": {"output_tokens": 30}}\n\n'
        b"data: [DONE]\n\n"
    )
    chunks = [stream[i : i + 7] for i in range(0, len(stream), 7)]
    assert _read(chunks, streaming=True) == 42


_ANTHROPIC_START = (
    b'event: message_start\ndata: {"type": "message_start", "message": {"usage":'
    b' {"input_tokens": 20, "output_tokens": 1}}}\n\n'
    b'event: content_block_delta\ndata: {"type": "content_block_delta"}\n\n'
)
_ANTHROPIC_END = (
    b'event: message_delta\ndata: {"type": "message_delta", "usage": {"output_tokens": 900}}\n\n'
    b'event: message_stop\ndata: {"type": "message_stop"}\n\n'
)


@pytest.mark.parametrize(
    ("stream", "tokens"),
    [
        (_ANTHROPIC_START + _ANTHROPIC_END, 920),
        (_ANTHROPIC_START, None),  # cut after its first events: the usage so far is not it
        (_ANTHROPIC_START + _ANTHROPIC_END[:-40], None),  # message_stop never came
        (
            b'data: {"type": "response.output_text.delta"}\n\n'
            b'data: {"type": "response.completed", "response": {"usage": {"total_tokens": 9}}}'
            b"\n\n",
            9,
        ),
        (b'data: {"type": "response.created", "response": {"usage": null}}\n\n', None),
        (b'data: {"usage": {"total_tokens": 5}}\n\n', None),  # chat, before its [DONE]
        (b'data: {"usage": {"total_tokens": 5}}\n\ndata: [DONE]\n\n', 5),
    ],
    ids=[
        "anthropic-whole",
        "anthropic-cut",
        "anthropic-no-stop",
        "responses-completed",
        "responses-cut",
        "chat-cut",
        "chat-done",
    ],
)
def test_a_stream_counts_its_usage_only_once_it_ended(stream: bytes, tokens: int | None) -> None:
    assert _read([stream], streaming=True) == tokens


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_a_stream_whose_text_holds_a_unicode_line_separator_is_read(separator: str) -> None:
    # JSON leaves these unescaped; only CR and LF end an event-stream line.
    stream = (
        f'data: {{"choices":[{{"delta":{{"content":"a{separator}b"}}}}]}}\n\n'
        'data: {"choices":[],"usage":{"total_tokens":9}}\n\ndata: [DONE]\n\n'
    ).encode()
    assert _read([stream], streaming=True) == 9


def test_a_stream_with_an_unreadable_event_reports_nothing() -> None:
    stream = b'data: {"usage": {"total_tokens": 5}}\n\ndata: {broken\n\n'
    assert _read([stream], streaming=True) is None


def test_a_body_over_the_limit_reports_nothing() -> None:
    reader = UsageReader(False)
    reader.feed(b'{"usage": {"total_tokens": 5}, "pad": "')
    reader.feed(b"x" * (8 * 1024 * 1024))
    reader.feed(b'"}')
    assert reader.tokens() is None
