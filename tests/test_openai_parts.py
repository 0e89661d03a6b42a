"""The OpenAI backend's parts on their own: the wire decoder, downgrading, error translation."""

from __future__ import annotations

import dataclasses
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest

from orchestrator.backends.base import Capabilities, TextDelta, UsageReport
from orchestrator.backends.openai_caps import downgraded, run_probe, stream_options_of
from orchestrator.backends.openai_errors import (
    TRANSLATIONS,
    Failure,
    Malformed,
    ServerSaid,
    translate,
    translate_deadline,
)
from orchestrator.backends.openai_wire import ChunkDecoder, SSEReader, parse_chunk
from orchestrator.errors import (
    EndpointUnreachable,
    ModelNotFound,
    RequestRejected,
    RetriesExhausted,
)
from orchestrator.retry import MalformedStream, make_throttler


async def _lines(lines: list[str]) -> AsyncIterator[str]:
    for line in lines:
        yield line


async def _events(lines: list[str]) -> list[tuple[str | None, str]]:
    sse = SSEReader(_lines(lines))
    out = []
    while (item := await sse.next()) is not None:
        out.append(item)
    return out


# ---------------------------------------------------------------------- SSE lines
async def test_sse_joins_data_lines_skips_comments_and_stops_at_done() -> None:
    lines = [": keep-alive", "data: {\"a\":", "data: 1}", "", "event: error", "data:x", "",
             "data: [DONE]", "", "data: {\"after\": 1}", ""]
    assert await _events(lines) == [(None, '{"a":\n1}'), ("error", "x")]


async def test_sse_returns_a_last_event_without_its_blank_line() -> None:
    assert await _events(["data: {}", ""]) == [(None, "{}")]
    assert await _events(["data: {\"x\": 2}"]) == [(None, '{"x": 2}')]
    assert await _events([]) == []
    # a body that ends in [DONE] without its blank line ends there (it was returned as
    # data, which the backend then read as a malformed stream; found by review)
    assert await _events(["data: {}", "", "data: [DONE]"]) == [(None, "{}")]


def test_parse_chunk_tells_garbage_from_a_server_error() -> None:
    assert parse_chunk((None, '{"choices": []}'), str) == {"choices": []}
    for bad in ("not json", '{"cut": ', "[1, 2]", "3"):
        with pytest.raises(Malformed):
            parse_chunk((None, bad), str)
    with pytest.raises(ServerSaid, match="boom"):
        parse_chunk((None, json.dumps({"error": {"message": "boom"}})), str)
    with pytest.raises(ServerSaid, match="HIDDEN"):
        parse_chunk(("error", '{"detail": "secret"}'),
                    lambda text: text.replace("secret", "HIDDEN"))


def test_an_error_event_with_a_flat_error_object_names_its_status() -> None:
    # ``event: error`` whose data is the error itself (no "error" key): its message and
    # status were lost, so a busy server's 503 was not retried (found by review)
    with pytest.raises(ServerSaid, match=r"^engine busy$") as caught:
        parse_chunk(("error", json.dumps({"message": "engine busy", "code": 503})), str)
    assert caught.value.status_code == 503
    with pytest.raises(ServerSaid) as caught:
        parse_chunk(("error", json.dumps({"type": "overloaded_error", "message": "x"})), str)
    assert caught.value.status_code == 503
    with pytest.raises(ServerSaid) as caught:
        parse_chunk(("error", json.dumps({"message": "bad prompt", "code": 400})), str)
    assert caught.value.status_code is None
    # the status beside an error given as plain text
    with pytest.raises(ServerSaid, match=r"^Overloaded$") as caught:
        parse_chunk((None, json.dumps({"error": "Overloaded", "code": 503})), str)
    assert caught.value.status_code == 503


# ---------------------------------------------------------------------- chunks -> events
def _chat_chunk(index: int, text: str, *, completion: int | None = None,
                finish: str | None = None) -> dict[str, Any]:
    chunk: dict[str, Any] = {"choices": [{"index": index, "delta": {"content": text},
                                          "finish_reason": finish}]}
    if completion is not None:
        chunk["usage"] = {"prompt_tokens": 7, "completion_tokens": completion}
    return chunk


def test_decoder_reads_a_usage_count_too_large_for_an_int() -> None:
    # JSON 1e400 is float inf: int() raised OverflowError, which escaped the decoder and
    # failed the stream as a non-backend error (found by review); it is no count, as a
    # string or null is
    chunk = json.loads('{"choices": [{"index": 0, "delta": {"content": "a"}}], '
                       '"usage": {"prompt_tokens": 1, "completion_tokens": 1e400}}')
    events = ChunkDecoder(n=1, chat=True).feed(chunk)
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["a"]


@pytest.mark.parametrize(("count", "expected"), [
    ("missing", None), (None, None), ("three", None), (-1, None), (2.5, None), (True, None),
    (3, 3), (3.0, 3), ("3", 3), ("3.0", 3)])
def test_a_usage_count_that_cannot_be_read_is_no_count_not_zero(count, expected) -> None:
    """A closing usage chunk whose completion_tokens is missing, null or not a whole number
    used to be a final count of 0, charged as exact over the deltas' own count (found by
    review): it is no usage at all now, and the deltas' estimate stands."""
    usage: dict[str, Any] = {"prompt_tokens": 7}
    if count != "missing":
        usage["completion_tokens"] = count
    events = ChunkDecoder(n=1, chat=True).feed({"choices": [], "usage": usage})
    reports = [e for e in events if isinstance(e, UsageReport)]
    if expected is None:
        assert reports == []
    else:
        assert [(r.completion_tokens, r.final) for r in reports] == [(expected, True)]


def test_a_reasoning_delta_is_a_token_apart_from_the_answer_text() -> None:
    decoder = ChunkDecoder(n=1, chat=True)
    for key in ("reasoning_content", "reasoning"):
        (event,) = decoder.feed({"choices": [{"index": 0, "delta": {"content": None,
                                                                      key: " hmm"}}]})
        assert event == TextDelta(choice=0, text="", tokens=1, estimated=True,
                                  reasoning=" hmm")


_BIG = "1" + "0" * 400  # a JSON integer float() cannot hold


@pytest.mark.parametrize(("chat", "raw"), [
    (True, '{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, '
           '"prompt_tokens_details": {"cached_tokens": 1e400}}}'),
    (True, '{"choices": [{"index": 0, "delta": {"content": "a"}, "logprobs": {"content": '
           '[{"token": "a", "logprob": -' + _BIG + '}]}}]}'),
    (True, '{"choices": [{"index": 0, "delta": {"content": "a"}, "logprobs": {"content": '
           '[{"token": "a", "logprob": -1, "top_logprobs": [{"token": "a", "logprob": -'
           + _BIG + '}]}]}}]}'),
    (False, '{"choices": [{"index": 0, "text": "a", "logprobs": {"tokens": ["a"], '
            '"token_logprobs": [-' + _BIG + ']}}]}'),
    (False, '{"choices": [{"index": 0, "text": "a", "logprobs": {"tokens": ["a"], '
            '"token_logprobs": [-1], "top_logprobs": [[["a", -1]]]}}]}'),
])
def test_decoder_reads_odd_numbers_and_shapes_as_no_value(chat, raw) -> None:
    # each raised OverflowError or AttributeError out of the decoder (found by review)
    events = ChunkDecoder(n=1, chat=chat).feed(json.loads(raw))
    assert events


def test_an_undecodable_chunk_is_malformed() -> None:
    from orchestrator.backends.openai_wire import decode

    with pytest.raises(Malformed, match="undecodable chunk"):
        decode(ChunkDecoder(n=1, chat=True), {"choices": 5})


def test_decoder_counts_per_choice_running_usage_exactly() -> None:
    decoder = ChunkDecoder(n=2, chat=True)
    out = []
    for chunk in (_chat_chunk(0, " a", completion=1), _chat_chunk(1, " b c", completion=2),
                  _chat_chunk(0, " d", completion=3, finish="stop"),
                  {"choices": [], "usage": {"prompt_tokens": 14, "completion_tokens": 5,
                                            "prompt_tokens_details": {"cached_tokens": 6}}}):
        out.extend(decoder.feed(chunk))
    assert out == [
        TextDelta(0, " a", 1), UsageReport(7, 1, final=False),
        TextDelta(1, " b c", 2), UsageReport(7, 3, final=False),
        TextDelta(0, " d", 2, finish_reason="stop"), UsageReport(7, 5, final=False),
        UsageReport(14, 5, final=True, cached_prompt_tokens=6),
    ]


def test_decoder_does_not_count_twice_a_usage_on_the_last_content_chunk() -> None:
    """A server that puts its only usage on its last content chunk: the count tops up the
    one-per-chunk estimates (6 in all), it is not added on top of them (11; found by
    review)."""
    decoder = ChunkDecoder(n=1, chat=True)
    out = []
    for i in range(6):
        out.extend(decoder.feed(_chat_chunk(0, f" t{i}", completion=6 if i == 5 else None,
                                            finish="stop" if i == 5 else None)))
    deltas = [e for e in out if isinstance(e, TextDelta)]
    assert [d.tokens for d in deltas] == [1, 1, 1, 1, 1, 1]
    assert sum(d.tokens for d in deltas) == 6 and out[-1] == UsageReport(7, 6, final=False)


def test_decoder_estimates_without_usage_and_counts_logprobs() -> None:
    decoder = ChunkDecoder(n=1, chat=False)
    assert decoder.feed({"choices": [{"index": 0, "text": "hi"}]}) == [
        TextDelta(0, "hi", 1, estimated=True)]
    lp = {"tokens": ["a", "b"], "token_logprobs": [-0.5, None],
          "top_logprobs": [{"a": -0.5, "z": -2.0}, None]}
    (delta,) = decoder.feed({"choices": [{"index": 0, "text": "ab", "logprobs": lp}]})
    assert delta.tokens == 2 and not delta.estimated
    assert [(t.token, t.logprob) for t in delta.logprobs] == [("a", -0.5), ("b", float("-inf"))]
    assert delta.logprobs[0].top == (("a", -0.5), ("z", -2.0))
    assert decoder.feed({"choices": [{"index": 0, "text": ""}]}) == []


# ---------------------------------------------------------------------- downgrading
FULL = Capabilities()


@pytest.mark.parametrize(("message", "kw", "expected"), [
    ("Unknown field continuous_usage_stats", {},
     Capabilities(continuous_usage=False)),
    ("stream_options not supported", {},
     Capabilities(stream_usage=False, continuous_usage=False)),
    ("n must be 1", {"n": 2}, Capabilities(n=False)),
    ("n must be 1", {}, None),  # a request with n=1 cannot drop n
    ("top_logprobs must be <= 5", {"top_logprobs": 20}, Capabilities(max_top_logprobs=5)),
    ("logprobs are not supported", {"top_logprobs": 1},
     Capabilities(logprobs=False, max_top_logprobs=None)),
    ("logprobs are not supported", {}, None),
    ("something else entirely", {"n": 2, "top_logprobs": 5}, None),
])
def test_downgraded_reads_a_400_once(message: str, kw: dict[str, Any],
                                     expected: Capabilities | None) -> None:
    assert downgraded(FULL, message, **kw) == expected


def test_two_downgrades_from_one_snapshot_keep_both() -> None:
    """Two requests sent with the same capabilities are refused for different features:
    the second downgrade, computed from its own (stale) snapshot, used to switch back on
    what the first had just switched off (n; found by review). Merged field by field,
    both stay off."""
    from orchestrator.backends.openai_caps import narrower

    first = downgraded(FULL, "'n' is not supported", n=2)
    second = downgraded(FULL, "stream_options.continuous_usage_stats is not allowed")
    assert first is not None and second is not None and second.n
    both = narrower(second, first)
    assert not both.n and not both.continuous_usage and both.stream_usage
    assert narrower(both, FULL) == both == narrower(FULL, both)
    fewer = downgraded(FULL, "logprobs: at most 5", top_logprobs=20)
    assert fewer is not None and narrower(fewer, FULL).max_top_logprobs == fewer.max_top_logprobs
    none = dataclasses.replace(FULL, logprobs=False, max_top_logprobs=None)
    assert narrower(fewer, none).max_top_logprobs is None and not narrower(fewer, none).logprobs


def test_downgraded_drops_the_continuous_counts_before_stream_options() -> None:
    caps = downgraded(FULL, "stream_options.continuous_usage_stats is not allowed")
    assert caps == Capabilities(continuous_usage=False)
    assert stream_options_of(caps) == {"include_usage": True}
    caps = downgraded(caps, "stream_options.continuous_usage_stats is not allowed")
    assert caps == Capabilities(stream_usage=False, continuous_usage=False)
    assert stream_options_of(caps) is None


async def test_a_probe_reply_of_odd_shapes_is_no_evidence_not_a_crash() -> None:
    """Chunks the decoder cannot read ("choices": 5, a list, a string) in a probe reply
    raised a bare TypeError out of the probe, past the reader (found by review); they are
    no evidence of a capability, and the readable ones still count."""
    async def call(*, n: int, stream_options: Any, top_logprobs: int | None = None
                   ) -> list[Any]:
        if top_logprobs is not None:
            return [{"choices": 5}, {"choices": [{"index": 0, "delta": {"content": "OK"},
                                                  "logprobs": {"content": 3}}]}]
        return [{"choices": 5}, [1], "junk", {"choices": [7, {"index": 0}]},
                {"choices": None, "usage": {"prompt_tokens": 3, "completion_tokens": 1}}]

    caps = await run_probe(call, "chat")
    assert caps == Capabilities(n=False, stream_usage=True, continuous_usage=False,
                                logprobs=False, max_top_logprobs=None)


async def test_probe_downgrades_through_the_same_reading() -> None:
    sent: list[tuple[int, Any, Any]] = []

    async def call(*, n: int, stream_options: Any, top_logprobs: int | None = None
                   ) -> list[Any]:
        sent.append((n, stream_options, top_logprobs))
        if top_logprobs is not None:
            if top_logprobs > 5:
                raise RequestRejected("top_logprobs too large", status_code=400)
            return [{"choices": [{"index": 0, "text": "OK", "logprobs": {
                "tokens": ["OK"], "token_logprobs": [-0.1], "top_logprobs": [{"OK": -0.1}]}}]}]
        if stream_options and "continuous_usage_stats" in stream_options:
            raise RequestRejected("unknown continuous_usage_stats", status_code=400)
        if n > 1:
            raise RequestRejected("'n' must be 1", status_code=400)
        return [{"choices": [{"index": 0, "text": "OK"}]},
                {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}]

    caps = await run_probe(call, "completions")
    assert caps == Capabilities(n=False, stream_usage=True, continuous_usage=False,
                                logprobs=True, max_top_logprobs=5)
    assert sent == [(2, {"include_usage": True, "continuous_usage_stats": True}, None),
                    (2, {"include_usage": True}, None), (1, {"include_usage": True}, None),
                    (1, None, 20), (1, None, 5)]


async def test_probe_lets_a_400_it_cannot_read_stand() -> None:
    async def call(**_: Any) -> list[Any]:
        raise RequestRejected("bad key", status_code=400)

    with pytest.raises(RequestRejected, match="bad key"):
        await run_probe(call, "chat")


# ---------------------------------------------------------------------- translation
class _Status(Exception):
    def __init__(self, status: int, body: Any = None) -> None:
        super().__init__(f"status {status}")
        self.status_code = status
        self.body = body


#: named like httpx's, which is how a failed connection is recognised
ConnectError = type("ConnectError", (Exception,), {})


def _cert_refused() -> BaseException:
    exc = ConnectError("verify failed")
    exc.__cause__ = ssl.SSLCertVerificationError(1, "self-signed certificate")
    return exc


async def _served() -> list[str]:
    return ["m1", "m2"]


async def _translate(exc: BaseException, hint: str = "") -> Any:
    return await translate(Failure(exc, "http://h/v1", "m", 3, hint), _served)


async def test_each_row_of_the_table_is_reached() -> None:
    cases = [
        (_Status(404, {"message": "The model `m` does not exist."}), ModelNotFound,
         "model 'm' is not served at http://h/v1 (The model `m` does not exist.); "
         "it serves: m1, m2"),
        (_Status(503, {"message": "busy"}), RetriesExhausted,
         "http://h/v1 (model 'm'): gave up after 3 attempt(s); last status 503: busy"),
        (_Status(401, {"message": "no key"}), RequestRejected,
         "http://h/v1 (model 'm') answered 401: no key"),
        (_cert_refused(), EndpointUnreachable,
         "cannot reach http://h/v1: its TLS certificate failed verification (ConnectError: "
         "verify failed (SSLCertVerificationError: self-signed certificate)); for a "
         "certificate from a private CA, point SSL_CERT_FILE at that CA's bundle"),
        (ConnectError("refused"), EndpointUnreachable,
         "cannot reach http://h/v1 after 3 attempt(s): ConnectError: refused"),
        (MalformedStream("garbage"), RetriesExhausted,
         "http://h/v1 (model 'm'): gave up after 3 attempt(s); last error: "
         "MalformedStream: garbage"),
        (ServerSaid("overloaded"), RequestRejected,
         "http://h/v1 (model 'm') sent an error in its stream: overloaded"),
        (KeyError("x"), RequestRejected, "http://h/v1 (model 'm') failed: KeyError: 'x'"),
    ]
    reached = set()
    for exc, cls, message in cases:
        error = await _translate(exc)
        assert type(error) is cls and str(error) == message
        reached.add(next(t.name for t in TRANSLATIONS if t.matches(
            Failure(exc, "http://h/v1", "m", 3))))
    assert reached == {t.name for t in TRANSLATIONS}


async def test_a_rejection_keeps_its_status_and_a_404_its_hint() -> None:
    error = await _translate(_Status(404, {"message": "no route"}), hint="; try /v1")
    assert isinstance(error, RequestRejected) and error.status_code == 404
    assert str(error).endswith("no route; try /v1")
    error = await _translate(_Status(400, {"message": "bad"}), hint="; try /v1")
    assert str(error).endswith("answered 400: bad")


async def test_model_not_found_without_a_model_list() -> None:
    async def nothing() -> None:
        return None

    error = await translate(Failure(_Status(400, {"code": "model_not_found", "message": "x"}),
                                    "http://h/v1", "m", 1), nothing)
    assert isinstance(error, ModelNotFound) and str(error).endswith("(x)")


def test_deadline_errors() -> None:
    refused = ConnectionRefusedError("refused")
    error = translate_deadline(refused, base_url="u", model="m", attempts=2, deadline=1.5)
    assert isinstance(error, EndpointUnreachable)
    assert str(error) == ("cannot reach u after 2 attempt(s) within the 1.5 s request deadline "
                          "(--timeout): ConnectionRefusedError: refused")
    error = translate_deadline(None, base_url="u", model="m", attempts=1, deadline=30)
    assert isinstance(error, RetriesExhausted)
    assert str(error) == ("u (model 'm'): no answer within the 30 s request deadline "
                          "(--timeout) after 1 attempt(s)")


# ---------------------------------------------------------------------- pacing
@pytest.mark.parametrize(("rate", "burst", "period"),
                         [(2.5, 2, 0.8), (0.5, 1, 2.0), (1.0, 1, 1.0), (10.0, 10, 1.0)])
def test_one_throttler_builder(rate: float, burst: int, period: float) -> None:
    throttler = make_throttler(rate)
    assert throttler is not None
    assert (throttler.rate_limit, throttler.period) == (burst, pytest.approx(period))
    assert make_throttler(None) is None
    with pytest.raises(ValueError):
        make_throttler(0.0)


def test_an_impossible_usage_report_is_not_charged_as_it_came() -> None:
    """A server's count is trusted within what is possible (found by review): a final 0
    after five tokens counted exactly by their logprobs was charged 0, 1e12 tokens for a
    request of 2 x 32 were charged, and a prompt of -7 was stored."""
    from orchestrator.ledger import RequestRecord

    def record() -> RequestRecord:
        return RequestRecord(request_id=1, kind="solve", n=2, max_tokens=32,
                             choice_tokens=[0, 0], choice_done=[False, False])

    zero = record()
    zero.add_delta(5, estimated=False)  # five logprob entries
    zero.add_usage(10, 0, final=True)
    assert zero.completion == 5
    assert zero.usage.completion_tokens == 5 and "streamed" in zero.usage.estimated_from
    rough = record()  # one token per chunk is an estimate: the final count stands
    rough.add_delta(5, estimated=True)
    rough.add_usage(10, 3, final=True)
    assert rough.usage.completion_tokens == 3
    huge = record()
    huge.add_usage(10, 10 ** 12, final=True)
    assert huge.usage.completion_tokens == 64 and huge.usage.estimated
    assert "capped" in huge.usage.estimated_from
    fine = record()
    fine.add_delta(7, estimated=False)
    fine.add_usage(10, 9, final=True)  # above what was streamed: the server's own count
    assert fine.usage.completion_tokens == 9 and not fine.usage.estimated
    events = ChunkDecoder(n=1, chat=True).feed(
        {"choices": [], "usage": {"prompt_tokens": -7, "completion_tokens": 3}})
    assert [(e.prompt_tokens, e.completion_tokens) for e in events
            if isinstance(e, UsageReport)] == [(0, 3)]


def test_a_usage_without_a_readable_prompt_count_is_an_unknown_prompt_not_an_exact_0() -> None:
    """A final usage with ``prompt_tokens`` missing or negative was recorded as an exact
    prompt of 0 (the completion side already treated an unreadable count as no count;
    found by review): it is 0 flagged ``prompt``, and an earlier readable count in the
    same stream stands."""
    from orchestrator.ledger import RequestRecord

    def record() -> RequestRecord:
        return RequestRecord(request_id=1, kind="solve", n=1, max_tokens=32,
                             choice_tokens=[0], choice_done=[False])

    for usage in ({"completion_tokens": 3}, {"prompt_tokens": -3, "completion_tokens": 3},
                  {"prompt_tokens": "many", "completion_tokens": 3}):
        alone = record()
        for e in ChunkDecoder(n=1, chat=True).feed({"choices": [], "usage": usage}):
            assert isinstance(e, UsageReport) and e.estimated_from == ("prompt",)
            alone.add_usage(e.prompt_tokens, e.completion_tokens, e.final,
                            estimated_from=e.estimated_from)
        assert alone.usage.prompt_tokens == 0 and alone.usage.completion_tokens == 3
        assert alone.usage.estimated and alone.usage.estimated_from == ("prompt",)
    earlier = record()
    earlier.add_usage(5, 1, final=False)  # a running count read the prompt
    earlier.add_usage(0, 3, final=True, estimated_from=("prompt",))
    assert earlier.usage.prompt_tokens == 5 and not earlier.usage.estimated
    assert earlier.usage.completion_tokens == 3
