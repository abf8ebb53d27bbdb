"""HTTP clients: (a) against the real teacher service, (b) retries and error decoding against a fault server.

The fault server is a plain http.server on a loopback port that answers each request with the next
scripted reply; it exists only to produce faults (429, 503, 502 HTML, silence) the real service cannot be
made to produce on demand.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from helpers import assert_same_scores
from opd_client import AsyncHttpTeacherClient, HttpTeacherClient, OpdError, convert, errors
from opd_client.retry import RetryPolicy
from opd_client.scores import ScoreResult, SequenceScores
from opd_common.embedded import DEFAULT_TEACHER, embedded_teacher_dir

SEQUENCES = [{"token_ids": [1, 2, 3, 4, 5], "prompt_len": 2}]
# No jitter, so waits are predictable; small backoffs keep the tests to seconds.
FAST_RETRY = RetryPolicy(
    max_attempts=4, initial_backoff_s=0.05, max_backoff_s=5.0, multiplier=2.0, jitter=0.0
)


# ---- the fault server -------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    hang_s: float = 0.0  # wait this long before answering (longer than the client's timeout: silence)


def json_reply(status: int, body: dict, **headers: str) -> Reply:
    return Reply(status, json.dumps(body).encode(), {"Content-Type": "application/json", **headers})


class FaultServer:
    """Answers request i with replies[i] (the last reply repeats) and records when each request came."""

    def __init__(self, replies: list[Reply]):
        self.replies = replies
        self.arrivals: list[float] = []
        self.request_headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _next_reply(self, headers: dict[str, str]) -> Reply:
        with self._lock:
            self.arrivals.append(time.monotonic())
            self.request_headers.append(headers)
            return self.replies[min(len(self.arrivals), len(self.replies)) - 1]

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fault_server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                reply = fault_server._next_reply(dict(self.headers))
                time.sleep(reply.hang_s)
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting, which is what a hang test wants

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def gaps(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.arrivals)]

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def fake_result() -> ScoreResult:
    rng = np.random.default_rng(0)
    top_logprobs_T_K = np.sort(rng.normal(-3, 1, size=(3, 4)).astype(np.float32), axis=1)[:, ::-1]
    scores = SequenceScores(
        token_logprobs_T=rng.normal(-2, 1, size=3).astype(np.float32),
        top_ids_T_K=rng.integers(0, 49152, size=(3, 4)).astype(np.int32),
        top_logprobs_T_K=np.ascontiguousarray(top_logprobs_T_K),
        tail_logprob_T=np.full(3, -0.5, dtype=np.float32),
    )
    return ScoreResult(model="fake", sequences=[scores], scored_tokens=3, forward_tokens=5)


def score_reply() -> Reply:
    return json_reply(200, convert.score_result_to_json(fake_result(), binary=True))


def error_reply(error: errors.OpdError, retry_after: str | None = None) -> Reply:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return json_reply(error.http_status, error.to_body(), **headers)


def score_with(kind: str, url: str, **client_kwargs: object) -> ScoreResult:
    """One score call through the sync or the async client."""
    if kind == "sync":
        with HttpTeacherClient(url, **client_kwargs) as client:
            return client.score(SEQUENCES, top_k=4)

    async def run() -> ScoreResult:
        async with AsyncHttpTeacherClient(url, **client_kwargs) as client:
            return await client.score(SEQUENCES, top_k=4)

    return asyncio.run(run())


def retry_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "opd_client.http_client" and r.levelno == logging.WARNING
    ]


# ---- (b) retries and errors against the fault server ------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_429_retry_after_is_honoured(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    busy = error_reply(errors.Overloaded("queue is full (64 waiting)"), retry_after="1")
    with FaultServer([busy, busy, score_reply()]) as server:
        started = time.monotonic()
        result = score_with(kind, server.url, retry=FAST_RETRY)
        elapsed = time.monotonic() - started
    assert_same_scores(result, fake_result())
    assert len(server.arrivals) == 3
    # The policy's own backoff is 0.05 s; only Retry-After explains a wait of >= 1 s per retry.
    assert all(gap >= 0.95 for gap in server.gaps()), server.gaps()
    assert elapsed >= 1.95
    warnings = retry_warnings(caplog)
    assert len(warnings) == 2
    assert all("429" in w and "queue is full" in w and "in 1.00 s" in w for w in warnings), warnings


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_503_without_retry_after_backs_off_exponentially(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.2, max_backoff_s=5.0, multiplier=2.0, jitter=0.0)
    down = error_reply(errors.Unavailable("the teacher is still loading its weights"))
    with FaultServer([down, down, down, score_reply()]) as server:
        result = score_with(kind, server.url, retry=policy)
    assert_same_scores(result, fake_result())
    gaps = server.gaps()
    assert len(gaps) == 3
    for gap, expected in zip(gaps, [0.2, 0.4, 0.8], strict=True):
        assert expected - 0.02 <= gap <= expected + 0.4, gaps
    assert len(retry_warnings(caplog)) == 3


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_400_is_raised_at_once(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    bad = error_reply(errors.InvalidRequest("top_k=100000 is above max_top_k=49152", field="top_k"))
    with FaultServer([bad, score_reply()]) as server, pytest.raises(errors.InvalidRequest) as info:
        score_with(kind, server.url, retry=FAST_RETRY)
    assert info.value.field == "top_k"
    assert "max_top_k=49152" in str(info.value)
    assert len(server.arrivals) == 1
    assert retry_warnings(caplog) == []


def test_html_502_from_a_proxy_becomes_a_clear_error() -> None:
    html = b"<html>\n<head><title>502 Bad Gateway</title></head>\n<body><center><h1>502 Bad Gateway</h1></center>\n<hr><center>nginx</center></body></html>"
    page = Reply(502, html, {"Content-Type": "text/html"})
    with FaultServer([page, score_reply()]) as server, pytest.raises(OpdError) as info:
        score_with("sync", server.url, retry=FAST_RETRY)
    message = str(info.value)
    assert info.value.http_status == 502
    assert "POST /v1/score" in message and "HTTP 502" in message and "non-JSON" in message
    assert "<title>502 Bad Gateway</title>" in message and "nginx" in message
    assert len(server.arrivals) == 1  # 502 is not in the retryable set (429/503/504)


def test_non_json_success_body_is_an_error() -> None:
    with (
        FaultServer([Reply(200, b"OK", {"Content-Type": "text/plain"})]) as server,
        pytest.raises(OpdError) as info,
    ):
        score_with("sync", server.url, retry=FAST_RETRY)
    assert "not a JSON object" in str(info.value) and "'OK'" in str(info.value)


def test_fastapi_detail_body_is_decoded() -> None:
    with (
        FaultServer([json_reply(404, {"detail": "Not Found"})]) as server,
        pytest.raises(errors.NotFound) as info,
    ):
        score_with("sync", server.url, retry=FAST_RETRY)
    assert "HTTP 404: Not Found" in str(info.value)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_silent_server_times_out_then_gives_up(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.05, multiplier=2.0, jitter=0.0)
    with FaultServer([Reply(hang_s=3.0)]) as server:
        started = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded) as info:
            score_with(kind, server.url, timeout=0.3, retry=policy)
        elapsed = time.monotonic() - started
    assert "no answer within 0.3 s" in str(info.value) and "after 3 attempts" in str(info.value)
    assert isinstance(info.value.__cause__, Exception) and "Timeout" in type(info.value.__cause__).__name__
    assert len(server.arrivals) == 3
    # three 0.3 s timeouts plus 0.05 + 0.1 s of backoff at least; that it gave up rather than waited out
    # the 3 s hang is asserted by the three arrivals and the "no answer within 0.3 s" message, not a clock
    assert elapsed >= 0.9
    warnings = retry_warnings(caplog)
    assert len(warnings) == 2 and all("ReadTimeout" in w for w in warnings), warnings


def test_unreachable_teacher() -> None:
    with FaultServer([score_reply()]) as server:
        url = server.url  # the port is free again once the server is closed
    with HttpTeacherClient(
        url, timeout=1.0, retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01)
    ) as client:
        assert client.ready() is False
        with pytest.raises(errors.Unavailable) as info:
            client.score(SEQUENCES, top_k=4)
    assert "ConnectError" in str(info.value) and "after 2 attempts" in str(info.value)


def test_ready_and_auth_header() -> None:
    with FaultServer([json_reply(200, {"status": "ok"}), json_reply(503, {"status": "loading"})]) as server:
        with HttpTeacherClient(server.url, api_key="sekrit") as client:
            assert client.ready() is True
            assert client.ready() is False
        with HttpTeacherClient(server.url) as anonymous:
            anonymous.ready()
    assert [h.get("Authorization") for h in server.request_headers] == [
        "Bearer sekrit",
        "Bearer sekrit",
        None,
    ]


# ---- (a) against the real teacher service -----------------------------------------------------------


@pytest.fixture(scope="module")
def client(teacher):
    with HttpTeacherClient(teacher.http_url, api_key=teacher.api_key, retry=RetryPolicy(max_attempts=2)) as c:
        yield c


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_teacher_dir())


CHAT = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name three primary colours."},
]


def chat_sequences(client: HttpTeacherClient) -> list[dict]:
    prompt_ids = client.tokenize(messages=CHAT)
    short = client.tokenize(text="Red, yellow and blue.")
    longer = client.tokenize(text="The three primary colours are red, yellow and blue.")
    return [
        {"token_ids": prompt_ids + short, "prompt_len": len(prompt_ids)},
        {"token_ids": prompt_ids + longer, "prompt_len": len(prompt_ids)},
    ]


def test_models_lists_both_teachers(client: HttpTeacherClient, hf_tokenizer) -> None:
    infos = client.models()
    names = [info.name for info in infos]
    assert names[0] == DEFAULT_TEACHER and set(names) == {DEFAULT_TEACHER, "tiny"}
    default = infos[0]
    assert default.vocab_size == len(hf_tokenizer) == 49152
    assert default.max_top_k == 49152
    assert len(default.tokenizer_sha256) == 64
    assert client.ready() is True


def test_tokenize_matches_transformers_chat_template(client: HttpTeacherClient, hf_tokenizer) -> None:
    expected = hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    expected_ids = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert client.tokenize(messages=CHAT) == expected_ids
    without = hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=True)
    without_ids = list(without["input_ids"] if hasattr(without, "keys") else without)
    assert client.tokenize(messages=CHAT, add_generation_prompt=False) == without_ids
    text = "Hello, world! 2+2=4."
    assert client.tokenize(text=text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_json_and_binary_formats_agree(client: HttpTeacherClient) -> None:
    sequences = chat_sequences(client)
    top_k = 20
    score_ids = [[[0, 1, 2]] * (len(s["token_ids"]) - s["prompt_len"]) for s in sequences]
    binary = client.score(sequences, top_k, score_ids=score_ids, format="binary")
    as_json = client.score(sequences, top_k, score_ids=score_ids, format="json")
    assert_same_scores(binary, as_json, atol=1e-6)
    for seq, scores in zip(sequences, binary.sequences, strict=True):
        T = len(seq["token_ids"]) - seq["prompt_len"]
        assert scores.top_ids_T_K.shape == (T, top_k) and scores.top_ids_T_K.dtype == np.int32
        assert scores.top_logprobs_T_K.shape == (T, top_k)
        assert scores.token_logprobs_T.shape == (T,) and scores.tail_logprob_T.shape == (T,)
        assert scores.score_logprobs_T_M.shape == (T, 3)
        assert np.all(np.diff(scores.top_logprobs_T_K, axis=1) <= 0)  # descending
    assert binary.scored_tokens == sum(len(s["token_ids"]) - s["prompt_len"] for s in sequences)


async def test_sync_and_async_clients_agree(client: HttpTeacherClient, teacher) -> None:
    sequences = chat_sequences(client)
    sync_result = await asyncio.to_thread(client.score, sequences, 8, model="tiny")
    async with AsyncHttpTeacherClient(teacher.http_url, api_key=teacher.api_key) as aclient:
        assert await aclient.ready() is True
        assert await aclient.models() == await asyncio.to_thread(client.models)
        assert (
            await aclient.tokenize(messages=CHAT) == sequences[0]["token_ids"][: sequences[0]["prompt_len"]]
        )
        async_result = await aclient.score(sequences, 8, model="tiny")
    assert async_result.model == "tiny"
    assert_same_scores(sync_result, async_result, atol=1e-6)


def test_missing_or_wrong_key_is_unauthenticated(teacher) -> None:
    for key in (None, "not-the-key"):
        with HttpTeacherClient(teacher.http_url, api_key=key, retry=RetryPolicy(max_attempts=3)) as client:
            assert client.ready() is True  # health is open to probes
            with pytest.raises(errors.Unauthenticated):
                client.models()
            with pytest.raises(errors.Unauthenticated):
                client.score(SEQUENCES, top_k=4)
