"""The gRPC face: (a) against the real teacher service, (b) server fault handling and client retries
against tiny in-test fakes that exist only to produce faults the real service cannot make on demand.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers import assert_same_scores, free_port, post_score
from opd_client import convert, errors, schema
from opd_client.base import make_score_request
from opd_client.grpc_client import MAX_MESSAGE_BYTES, GrpcTeacherClient
from opd_client.retry import RetryPolicy
from opd_client.scores import ScoreResult, SequenceScores
from opd_client.v1 import teacher_pb2 as pb
from opd_client.v1 import teacher_pb2_grpc as pb_grpc
from opd_teacher.grpc_server import build_grpc_server, set_not_serving

DEFAULT = "smollm2-135m-instruct"
VOCAB = 49152
ATOL = 1e-6
PROMPT = [1, 28, 3557, 314, 253, 4107, 28, 198, 2]  # any ids below VOCAB
COMPLETION = [504, 3657, 314, 253, 1345, 30, 2]
FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=5.0, jitter=0.0)


# ---- helpers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel(teacher):
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    with grpc.insecure_channel(teacher.grpc_target, options) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.TeacherStub(channel)


@pytest.fixture(scope="module")
def client(teacher):
    with GrpcTeacherClient(teacher.grpc_target, api_key=teacher.api_key, retry=FAST_RETRY) as c:
        yield c


def auth(teacher) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {teacher.api_key}"),)


def request(
    token_ids: list[int] | None = None, prompt_len: int | None = None, top_k: int = 8, **kwargs
) -> schema.ScoreRequest:
    """One sequence (PROMPT + COMPLETION unless given) as a validated request."""
    if token_ids is None:
        token_ids, prompt_len = PROMPT + COMPLETION, len(PROMPT)
    return make_score_request([{"token_ids": token_ids, "prompt_len": prompt_len}], top_k, **kwargs)


def http_score(teacher, req: schema.ScoreRequest) -> ScoreResult:
    body = req.model_dump(exclude_none=True) | {"format": "binary"}
    return convert.score_result_from_json(post_score(teacher, body))


def trailers(e: grpc.RpcError) -> dict[str, str]:
    return dict(e.trailing_metadata() or ())


# ---- (a) the real service -----------------------------------------------------------------------------


def test_get_info_lists_both_models(teacher, stub, client):
    reply = stub.GetInfo(pb.GetInfoRequest(), metadata=auth(teacher), timeout=30)
    models = {m.name: m for m in reply.models}
    assert [m.name for m in reply.models] == [DEFAULT, "tiny"]  # the default teacher first
    for m in models.values():
        assert m.vocab_size == VOCAB
        assert m.max_top_k == VOCAB
        assert len(m.tokenizer_sha256) == 64 and int(m.tokenizer_sha256, 16) >= 0
    # the tiny model reuses the default teacher's tokenizer, so the hashes agree
    assert models[DEFAULT].tokenizer_sha256 == models["tiny"].tokenizer_sha256
    infos = client.models()
    assert [i.model_dump() for i in infos] == [
        convert.model_info_from_proto(m).model_dump() for m in reply.models
    ]


@pytest.mark.parametrize(
    "req",
    [
        request(top_k=20),
        request(model="tiny", top_k=VOCAB),  # the whole vocabulary: ~390 KB per position
        request(top_k=5, temperature=0.7, score_ids=[[[11, 12, 13]] * len(COMPLETION)]),
        make_score_request(
            [
                {
                    "token_ids": PROMPT + COMPLETION,
                    "prompt_len": len(PROMPT),
                    "teacher_prefix_ids": [1, 28, 7],
                },
                {"token_ids": [1, 2, 3, 4], "prompt_len": 1},
            ],
            top_k=16,
        ),
    ],
    ids=["top20", "tiny-full-vocab", "temperature-score-ids", "prefix-two-sequences"],
)
def test_score_equals_http(teacher, client, req):
    assert_same_scores(client.score(**_score_kwargs(req)), http_score(teacher, req), atol=ATOL)


def _score_kwargs(req: schema.ScoreRequest) -> dict:
    return {
        "sequences": req.sequences,
        "top_k": req.top_k,
        "temperature": req.temperature,
        "score_ids": req.score_ids,
        "model": req.model,
    }


def test_score_stream_mixes_results_and_per_item_errors(teacher, stub, client):
    good = {
        "good-0": request(top_k=4),
        "good-1": request(model="tiny", top_k=12),
        "good-2": request(token_ids=[1, 2, 3, 4, 5], prompt_len=2, top_k=3),
    }
    bad = {  # request id -> (request, code, field)
        "bad-vocab": (
            request(token_ids=[1, 2, VOCAB + 5], prompt_len=1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sequences[0].token_ids[2]",
        ),
        "bad-model": (request(model="no-such-model"), grpc.StatusCode.NOT_FOUND, "model"),
        "bad-top-k": (request(top_k=VOCAB + 1), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        "bad-prompt-len": (
            request(token_ids=[1, 2], prompt_len=2),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sequences[0].prompt_len",
        ),
    }
    order = ["good-0", "bad-vocab", "good-1", "bad-model", "bad-top-k", "good-2", "bad-prompt-len"]
    outgoing = [
        pb.ScoreStreamRequest(
            request_id=rid, request=convert.score_request_to_proto(good.get(rid) or bad[rid][0])
        )
        for rid in order
    ]
    answers = list(stub.ScoreStream(iter(outgoing), metadata=auth(teacher), timeout=120))
    by_id = {a.request_id: a for a in answers}
    # answered as they finish: the last request fails validation at once, before the queued forwards end
    assert answers[-1].request_id != "bad-prompt-len", [a.request_id for a in answers]
    assert sorted(by_id) == sorted(order) and len(answers) == len(order)
    for rid, req in good.items():
        assert by_id[rid].WhichOneof("outcome") == "response", by_id[rid]
        assert_same_scores(
            convert.score_result_from_proto(by_id[rid].response),
            client.score(**_score_kwargs(req)),
            atol=ATOL,
        )
    for rid, (_, code, field) in bad.items():
        assert by_id[rid].WhichOneof("outcome") == "error", rid
        err = by_id[rid].error
        assert err.grpc_code == code.value[0], (rid, err)
        assert err.field == field and field in err.message, (rid, err)

    # the client pairs outcomes with request indices and raises nothing for per-item errors
    requests = [good.get(rid) or bad[rid][0] for rid in order]
    outcomes = dict(client.score_stream(requests))
    assert sorted(outcomes) == list(range(len(order)))
    for i, rid in enumerate(order):
        if rid in good:
            assert_same_scores(outcomes[i], client.score(**_score_kwargs(good[rid])), atol=ATOL)
        else:
            assert isinstance(outcomes[i], errors.OpdError) and outcomes[i].field == bad[rid][2], outcomes[i]


@pytest.mark.parametrize(
    ("metadata", "message"),
    [((), "missing authorization metadata"), ((("authorization", "Bearer nope"),), "wrong API key")],
    ids=["no-key", "wrong-key"],
)
def test_auth_is_required_except_for_health(teacher, stub, channel, metadata, message):
    calls = [
        lambda: stub.GetInfo(pb.GetInfoRequest(), metadata=metadata, timeout=30),
        lambda: stub.Score(convert.score_request_to_proto(request()), metadata=metadata, timeout=30),
        lambda: list(
            stub.ScoreStream(iter([pb.ScoreStreamRequest(request_id="x")]), metadata=metadata, timeout=30)
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert message in info.value.details()
    with pytest.raises(errors.Unauthenticated, match=message):
        GrpcTeacherClient(teacher.grpc_target, api_key=None if not metadata else "nope").models()

    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "opd.v1.Teacher"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), metadata=metadata, timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert GrpcTeacherClient(teacher.grpc_target).ready()


@pytest.mark.parametrize(
    ("req", "code", "error_class", "field", "in_message"),
    [
        (
            request(model="no-such-model"),
            grpc.StatusCode.NOT_FOUND,
            errors.NotFound,
            "model",
            "no-such-model",
        ),
        (
            request(token_ids=PROMPT + [5, VOCAB, 6], prompt_len=len(PROMPT)),
            grpc.StatusCode.INVALID_ARGUMENT,
            errors.InvalidRequest,
            f"sequences[0].token_ids[{len(PROMPT) + 1}]",
            f"[0, {VOCAB})",
        ),
        (
            request(top_k=VOCAB + 1),
            grpc.StatusCode.INVALID_ARGUMENT,
            errors.InvalidRequest,
            "top_k",
            str(VOCAB),
        ),
        # 3 x 6000 = 18000 tokens > --max-tokens 16384 (HTTP says 413; gRPC INVALID_ARGUMENT, never retried)
        (
            make_score_request([{"token_ids": [5] * 6000, "prompt_len": 10}] * 3, top_k=1),
            grpc.StatusCode.INVALID_ARGUMENT,
            errors.InvalidRequest,
            "sequences",
            "16384",
        ),
    ],
    ids=["unknown-model", "token-id-out-of-vocab", "top-k-above-max", "too-many-tokens"],
)
def test_errors_map_to_status_codes(teacher, stub, client, req, code, error_class, field, in_message):
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(convert.score_request_to_proto(req), metadata=auth(teacher), timeout=60)
    assert info.value.code() == code
    assert in_message in info.value.details() and field in info.value.details()
    assert trailers(info.value).get("opd-field") == field

    started = time.monotonic()
    with pytest.raises(error_class) as raised:
        client.score(**_score_kwargs(req))
    assert raised.value.field == field
    assert time.monotonic() - started < 5  # not retried
    if field == "sequences":
        assert isinstance(raised.value, errors.InvalidRequest) and raised.value.retry_after is None

    # the service is still fine afterwards
    result = client.score(**_score_kwargs(request(top_k=3)))
    assert result.sequences[0].top_ids_T_K.shape == (len(COMPLETION), 3)


def test_tokenize_is_http_only(client):
    with pytest.raises(NotImplementedError, match="HTTP-only"):
        client.tokenize(text="hello")


# ---- (b) fakes that produce faults --------------------------------------------------------------------


def fake_result(model: str = "fake") -> ScoreResult:
    rng = np.random.default_rng(0)
    scores = SequenceScores(
        token_logprobs_T=rng.normal(-2, 1, size=3).astype(np.float32),
        top_ids_T_K=rng.integers(0, VOCAB, size=(3, 4)).astype(np.int32),
        top_logprobs_T_K=np.sort(rng.normal(-3, 1, size=(3, 4)).astype(np.float32), axis=1)[:, ::-1].copy(),
        tail_logprob_T=np.full(3, -0.5, dtype=np.float32),
    )
    return ScoreResult(model=model, sequences=[scores], scored_tokens=3, forward_tokens=5)


class BusyTwiceTeacher(pb_grpc.TeacherServicer):
    """Answers RESOURCE_EXHAUSTED with retry-after twice, then a result."""

    def __init__(self, retry_after_s: float):
        self.retry_after_s = retry_after_s
        self.arrivals: list[float] = []

    async def Score(self, request, context):
        self.arrivals.append(time.monotonic())
        if len(self.arrivals) <= 2:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "queue is full (64 waiting)",
                trailing_metadata=(("retry-after", f"{self.retry_after_s:g}"),),
            )
        return convert.score_result_to_proto(fake_result())

    async def ScoreStream(self, request_iterator, context):
        """The first stream answers one request, then breaks as UNAVAILABLE; later streams answer all."""
        self.arrivals.append(time.monotonic())
        first_stream = len(self.arrivals) == 1
        self.stream_ids = getattr(self, "stream_ids", []) + [[]]
        async for item in request_iterator:
            self.stream_ids[-1].append(item.request_id)
            yield pb.ScoreStreamResponse(
                request_id=item.request_id,
                response=convert.score_result_to_proto(fake_result(item.request_id)),
            )
            if first_stream:
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    "draining",
                    trailing_metadata=(("retry-after", f"{self.retry_after_s:g}"),),
                )


async def start_fake(servicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    pb_grpc.add_TeacherServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_client_retries_resource_exhausted_after_retry_after():
    fake = BusyTwiceTeacher(retry_after_s=0.4)
    server, target = await start_fake(fake)
    try:
        with GrpcTeacherClient(target, retry=FAST_RETRY) as client:
            started = time.monotonic()
            result = await asyncio.to_thread(client.score, [{"token_ids": [1, 2, 3, 4], "prompt_len": 1}], 4)
            elapsed = time.monotonic() - started
    finally:
        await server.stop(0)
    assert_same_scores(result, fake_result(), atol=0.0)
    assert len(fake.arrivals) == 3
    gaps = [b - a for a, b in itertools.pairwise(fake.arrivals)]
    # the policy's own backoff is 0.01 s; only retry-after explains a wait of >= 0.4 s per retry
    assert all(gap >= 0.39 for gap in gaps), gaps
    assert elapsed >= 0.79


async def test_client_stream_reconnects_and_answers_each_request_once():
    fake = BusyTwiceTeacher(retry_after_s=0.2)
    server, target = await start_fake(fake)
    requests = [request(token_ids=[1, 2, 3 + i], prompt_len=1, top_k=2) for i in range(5)]
    try:
        with GrpcTeacherClient(target, retry=FAST_RETRY) as client:
            outcomes = await asyncio.to_thread(lambda: list(client.score_stream(iter(requests))))
    finally:
        await server.stop(0)
    indices = [i for i, _ in outcomes]
    assert sorted(indices) == list(range(5))  # each exactly once
    assert all(isinstance(o, ScoreResult) and o.model == str(i) for i, o in outcomes)
    assert len(fake.arrivals) == 2 and fake.arrivals[1] - fake.arrivals[0] >= 0.19
    answered_first = fake.stream_ids[0][0]
    assert answered_first not in fake.stream_ids[1]  # only unanswered requests are resent
    assert sorted(fake.stream_ids[1] + [answered_first]) == [str(i) for i in range(5)]


def test_client_retries_connection_failures_then_raises_unavailable():
    port = free_port()  # nothing listens here
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.1, jitter=0.0)
    with GrpcTeacherClient(f"127.0.0.1:{port}", retry=policy, timeout=5) as client:
        started = time.monotonic()
        with pytest.raises(errors.Unavailable, match=f"GetInfo at 127.0.0.1:{port}"):
            client.models()
        assert time.monotonic() - started >= 0.1 + 0.2  # two backoffs: 3 attempts in all
        assert not client.ready()


class FaultyEngine:
    """Stands in for TeacherEngine only to raise what the real one never should."""

    def __init__(self):
        self.loaded = True
        self.ready = True
        self.draining = False
        self.calls = 0

    def infos(self) -> list[schema.ModelInfo]:
        return [
            schema.ModelInfo(
                name="faulty",
                revision="0",
                vocab_size=VOCAB,
                tokenizer_sha256="0" * 64,
                max_top_k=8,
                max_tokens=100,
                max_sequence_len=100,
                dtype="float32",
                device="cpu",
                source="test",
            )
        ]

    async def score(self, req: schema.ScoreRequest, deadline: float | None = None) -> ScoreResult:
        self.calls += 1
        if self.calls % 2:
            raise RuntimeError("boom")
        return fake_result("faulty")


async def test_server_maps_unexpected_errors_to_internal_and_keeps_serving():
    engine = FaultyEngine()
    server = build_grpc_server(engine, "127.0.0.1", 0, {"k"})
    await server.start()
    metadata = (("authorization", "Bearer k"),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.opd_port}") as ch:
            stub, health = pb_grpc.TeacherStub(ch), health_pb2_grpc.HealthStub(ch)
            req = convert.score_request_to_proto(request())
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Score(req, metadata=metadata)
            assert (
                info.value.code() == grpc.StatusCode.INTERNAL and "RuntimeError: boom" in info.value.details()
            )
            assert (await stub.Score(req, metadata=metadata)).model == "faulty"

            # more items than the per-stream in-flight bound (64): every one is still answered
            items = [pb.ScoreStreamRequest(request_id=str(i), request=req) for i in range(150)]
            answers = [a async for a in stub.ScoreStream(iter(items), metadata=metadata)]
            assert sorted(int(a.request_id) for a in answers) == list(range(150))
            kinds = [a.WhichOneof("outcome") for a in answers]
            assert kinds.count("error") == kinds.count("response") == 75
            assert all(
                a.error.grpc_code == grpc.StatusCode.INTERNAL.value[0] for a in answers if a.HasField("error")
            )

            check = health_pb2.HealthCheckRequest(service="opd.v1.Teacher")
            assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING
            set_not_serving(server)
            assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert len((await stub.GetInfo(pb.GetInfoRequest(), metadata=metadata)).models) == 1
    finally:
        await server.stop(0)
