"""Compact score payloads against the real service: protobuf over HTTP (Accept negotiation), float16
logprobs (`logprob_dtype`), and the bytes per scored token each format costs.

float16 keeps 11 significant bits, so rounding to nearest moves a logprob x by at most 2^-11·|x| in the
normal range and by at most 2^-25 (half the smallest subnormal step) below 2^-14; logprobs here lie in
[-87.34, 0] (the tail floor is log(float32 tiny)), far from float16's -65504 limit.
"""

from __future__ import annotations

import asyncio

import grpc
import httpx
import numpy as np
import pytest

from helpers import assert_same_scores
from opd_client import AsyncHttpTeacherClient, HttpTeacherClient, convert, errors
from opd_client.base import make_score_request
from opd_client.grpc_client import MAX_MESSAGE_BYTES, GrpcTeacherClient
from opd_client.retry import RetryPolicy
from opd_client.scores import ScoreResult
from opd_client.v1 import teacher_pb2 as pb
from opd_client.v1 import teacher_pb2_grpc as pb_grpc
from opd_teacher.http.app import wants_protobuf

TOP_K = 20
PROTOBUF = "application/x-protobuf"
F16_REL, F16_ABS = 2.0**-11, 2.0**-25
LOGPROB_ATTRS = ("token_logprobs_T", "top_logprobs_T_K", "tail_logprob_T", "score_logprobs_T_M")
LOGPROB_KEYS = ("token_logprobs", "top_logprobs", "tail_logprobs", "score_logprobs")
NO_RETRY = RetryPolicy(max_attempts=1)
TEXT = (
    "On-policy distillation trains a small student on its own samples while a larger teacher grades "
    "every token. The student writes an answer, the teacher reads it back and returns, for each "
    "position, the log-probabilities of its most likely next tokens, and the trainer pulls the "
    "student's distribution towards the teacher's where the student actually went. "
)


# ---- helpers ------------------------------------------------------------------------------------------


def post(teacher, body: dict, accept: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {teacher.api_key}"}
    if accept is not None:
        headers["Accept"] = accept
    return httpx.post(f"{teacher.http_url}/v1/score", json=body, headers=headers, timeout=120)


def media_type(r: httpx.Response) -> str:
    return r.headers.get("content-type", "").split(";")[0]


def decode(r: httpx.Response) -> ScoreResult:
    """A 200 answer by its Content-Type: protobuf or JSON (lists or base64)."""
    assert r.status_code == 200, r.text
    if media_type(r) == PROTOBUF:
        return convert.score_result_from_proto(pb.ScoreResponse.FromString(r.content))
    assert media_type(r) == "application/json", r.headers
    return convert.score_result_from_json(r.json())


def as_proto(r: httpx.Response) -> pb.ScoreResponse:
    assert r.status_code == 200 and media_type(r) == PROTOBUF, (r.status_code, r.headers)
    return pb.ScoreResponse.FromString(r.content)


def assert_float16_of(f16: ScoreResult, f32: ScoreResult) -> float:
    """f16's logprobs are f32's rounded to the nearest float16, decoded to float32; the max |error|."""
    assert (f16.model, f16.scored_tokens, f16.forward_tokens) == (
        f32.model,
        f32.scored_tokens,
        f32.forward_tokens,
    )
    worst = 0.0
    for a, b in zip(f16.sequences, f32.sequences, strict=True):
        np.testing.assert_array_equal(a.top_ids_T_K, b.top_ids_T_K)
        for attr in LOGPROB_ATTRS:
            x16, x32 = getattr(a, attr), getattr(b, attr)
            assert (x16 is None) == (x32 is None), attr
            if x32 is None:
                continue
            assert x16.dtype == np.float32 and x16.shape == x32.shape, attr
            err = np.abs(x16.astype(np.float64) - x32.astype(np.float64))
            bound = F16_REL * np.abs(x32.astype(np.float64)) + F16_ABS
            assert np.all(err <= bound), (attr, float(np.max(err - bound)))
            np.testing.assert_array_equal(x16, x32.astype(np.float16).astype(np.float32), err_msg=attr)
            worst = max(worst, float(err.max(initial=0.0)))
    return worst


def assert_wire_dtypes(msg: pb.ScoreResponse, logprob_dtype: str) -> None:
    """Every logprob Tensor is sent as logprob_dtype (2 or 4 bytes per value); ids as int32."""
    itemsize = np.dtype(logprob_dtype).itemsize
    for seq in msg.sequences:
        assert seq.top_ids.dtype == "int32" and len(seq.top_ids.data) == 4 * int(np.prod(seq.top_ids.shape))
        for key in LOGPROB_KEYS:
            if seq.HasField(key):
                tensor = getattr(seq, key)
                assert tensor.dtype == logprob_dtype, key
                assert len(tensor.data) == itemsize * int(np.prod(tensor.shape)), key


# ---- requests -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_ids(teacher) -> list[int]:
    with HttpTeacherClient(teacher.http_url, api_key=teacher.api_key) as client:
        ids = client.tokenize(text=TEXT)
    assert len(ids) > 40
    return (ids * (256 // len(ids) + 1))[:256]


@pytest.fixture(scope="module")
def body(text_ids) -> dict:
    """Two sequences, score_ids on the first and a teacher prefix on the second: every array kind."""
    return {
        "sequences": [
            {"token_ids": text_ids[:40], "prompt_len": 24},
            {"token_ids": text_ids[40:70], "prompt_len": 10, "teacher_prefix_ids": text_ids[100:130]},
        ],
        "top_k": TOP_K,
        "score_ids": [[[0, 17, 9531]] * 16, [[5, 6, 7]] * 20],
    }


# ---- protobuf over HTTP -------------------------------------------------------------------------------


def test_protobuf_json_and_binary_are_identical_in_float32(teacher, body):
    as_json = post(teacher, body)
    as_binary = post(teacher, {**body, "format": "binary"})
    as_protobuf = post(teacher, body, accept=PROTOBUF)
    assert media_type(as_json) == media_type(as_binary) == "application/json"
    assert media_type(as_protobuf) == PROTOBUF
    assert all(r.headers["vary"] == "Accept" for r in (as_json, as_binary, as_protobuf))
    assert_wire_dtypes(as_proto(as_protobuf), "float32")
    reference = decode(as_json)
    assert reference.sequences[0].score_logprobs_T_M.shape == (16, 3)
    assert_same_scores(decode(as_binary), reference, atol=0.0)
    assert_same_scores(decode(as_protobuf), reference, atol=0.0)
    # "format" only chooses between the JSON bodies: under Accept protobuf it changes nothing
    assert post(teacher, {**body, "format": "binary"}, accept=PROTOBUF).content == as_protobuf.content


@pytest.mark.parametrize(
    ("accept", "protobuf"),
    [
        (None, False),
        ("*/*", False),
        ("application/json", False),
        (PROTOBUF, True),
        (f"{PROTOBUF}, application/json;q=0.5", True),  # what the opd HTTP clients send
        (f"application/json, {PROTOBUF};q=0.5", False),
        (f"{PROTOBUF};q=0", False),
    ],
)
def test_accept_negotiation(accept, protobuf):
    assert wants_protobuf(accept) is protobuf


def test_errors_stay_json_whatever_accept_says(teacher, body):
    r = post(teacher, {**body, "top_k": 0}, accept=PROTOBUF)
    assert r.status_code == 400 and media_type(r) == "application/json"
    assert r.json()["error"]["param"] == "top_k"


def test_openapi_describes_the_protobuf_answer_and_logprob_dtype(teacher):
    r = httpx.get(f"{teacher.http_url}/openapi.json", headers={"Authorization": f"Bearer {teacher.api_key}"})
    api = r.json()
    ok = api["paths"]["/v1/score"]["post"]["responses"]["200"]
    assert set(ok["content"]) == {"application/json", PROTOBUF}
    assert "opd.v1.ScoreResponse" in ok["description"]
    dtype = api["components"]["schemas"]["ScoreRequest"]["properties"]["logprob_dtype"]
    assert dtype["enum"] == ["float32", "float16"] and dtype["default"] == "float32"


# ---- float16 logprobs ---------------------------------------------------------------------------------


def test_float16_is_the_float32_rounded_in_every_http_format(teacher, body):
    f32 = decode(post(teacher, body, accept=PROTOBUF))
    f16_body = {**body, "logprob_dtype": "float16"}
    as_protobuf = post(teacher, f16_body, accept=PROTOBUF)
    assert_wire_dtypes(as_proto(as_protobuf), "float16")
    as_binary = post(teacher, {**f16_body, "format": "binary"})
    assert {
        a["dtype"] for s in as_binary.json()["sequences"] for k, a in s.items() if k in LOGPROB_KEYS if a
    } == {"float16"}
    worst = assert_float16_of(decode(as_protobuf), f32)
    # the three encodings carry the same float16 numbers (JSON lists hold them exactly)
    assert_same_scores(decode(as_binary), decode(as_protobuf), atol=0.0)
    assert_same_scores(decode(post(teacher, f16_body)), decode(as_protobuf), atol=0.0)
    print(f"float16 max |error| over {f32.scored_tokens} positions: {worst:.3g}")
    assert 0 < worst <= 2.0**-5  # |logprob| <= 87.34 < 128, where float16's half-step is 2^-5


def test_grpc_float16_matches_http(teacher, body):
    req = make_score_request(body["sequences"], TOP_K, score_ids=body["score_ids"])
    req16 = req.model_copy(update={"logprob_dtype": "float16"})
    http16 = decode(post(teacher, {**body, "logprob_dtype": "float16"}, accept=PROTOBUF))
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    with grpc.insecure_channel(teacher.grpc_target, options) as channel:
        reply = pb_grpc.TeacherStub(channel).Score(
            convert.score_request_to_proto(req16),
            metadata=(("authorization", f"Bearer {teacher.api_key}"),),
            timeout=120,
        )
    assert_wire_dtypes(reply, "float16")
    assert_same_scores(convert.score_result_from_proto(reply), http16, atol=0.0)
    with GrpcTeacherClient(teacher.grpc_target, api_key=teacher.api_key, retry=NO_RETRY) as client:
        unary = client.score(body["sequences"], TOP_K, score_ids=body["score_ids"], logprob_dtype="float16")
        streamed = dict(client.score_stream([req16, req]))
        f32 = client.score(body["sequences"], TOP_K, score_ids=body["score_ids"])
    assert_same_scores(unary, http16, atol=0.0)
    assert_float16_of(unary, f32)
    # The two streamed requests may share one batched (padded) forward, whose float32 values differ from
    # a lone forward's by ~1e-5 (and may round to a neighbouring float16); they agree with each other.
    assert_float16_of(streamed[0], streamed[1])
    assert_same_scores(streamed[1], f32, atol=1e-3)


def test_http_clients_default_to_protobuf_and_take_logprob_dtype(teacher, body):
    seen: list[str] = []
    kwargs = {"score_ids": body["score_ids"]}
    with HttpTeacherClient(teacher.http_url, api_key=teacher.api_key, retry=NO_RETRY) as client:
        client._http.event_hooks["response"].append(lambda r: seen.append(media_type(r)))
        default = client.score(body["sequences"], TOP_K, **kwargs)
        f16 = client.score(body["sequences"], TOP_K, logprob_dtype="float16", **kwargs)
        by_format = {
            f: client.score(body["sequences"], TOP_K, format=f, **kwargs) for f in ("json", "binary")
        }
    assert seen == [PROTOBUF, PROTOBUF, "application/json", "application/json"]
    for result in by_format.values():
        assert_same_scores(result, default, atol=0.0)
    assert_float16_of(f16, default)

    async def run() -> ScoreResult:
        async with AsyncHttpTeacherClient(
            teacher.http_url, api_key=teacher.api_key, retry=NO_RETRY
        ) as aclient:
            return await aclient.score(body["sequences"], TOP_K, logprob_dtype="float16", **kwargs)

    assert_same_scores(asyncio.run(run()), f16, atol=0.0)


# ---- a bad logprob_dtype ------------------------------------------------------------------------------


def test_bad_logprob_dtype_names_the_field(teacher, body):
    r = post(teacher, {**body, "logprob_dtype": "float64"}, accept=PROTOBUF)
    assert r.status_code in (400, 422) and media_type(r) == "application/json"
    error = r.json()["error"]
    assert error["param"] == "logprob_dtype" and "logprob_dtype" in error["message"], error
    assert "float64" in error["message"], error

    req = make_score_request(body["sequences"], TOP_K)
    bad = convert.score_request_to_proto(req)
    bad.logprob_dtype = "float64"
    with grpc.insecure_channel(teacher.grpc_target) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.TeacherStub(channel).Score(
            bad, metadata=(("authorization", f"Bearer {teacher.api_key}"),), timeout=60
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "logprob_dtype" in info.value.details()
    assert dict(info.value.trailing_metadata())["opd-field"] == "logprob_dtype"

    # the clients pass the value through and raise the service's error, field included
    http_client = HttpTeacherClient(teacher.http_url, api_key=teacher.api_key, retry=NO_RETRY)
    grpc_client = GrpcTeacherClient(teacher.grpc_target, api_key=teacher.api_key, retry=NO_RETRY)
    with http_client, pytest.raises(errors.InvalidRequest) as http_info:
        http_client.score(body["sequences"], TOP_K, logprob_dtype="float64")
    with grpc_client, pytest.raises(errors.InvalidRequest) as grpc_info:
        grpc_client.score(body["sequences"], TOP_K, logprob_dtype="float64")
    assert http_info.value.field == grpc_info.value.field == "logprob_dtype"


# ---- bytes per scored token ---------------------------------------------------------------------------


def test_bytes_per_scored_token(teacher, text_ids):
    """Real response bodies for one 256-token sequence at top_k = 20 (every position scored)."""
    base = {"sequences": [{"token_ids": text_ids, "prompt_len": 0}], "top_k": TOP_K}
    variants = {
        "json": (base, None),
        "json float16": ({**base, "logprob_dtype": "float16"}, None),
        "binary (base64 JSON)": ({**base, "format": "binary"}, None),
        "binary float16": ({**base, "format": "binary", "logprob_dtype": "float16"}, None),
        "protobuf": (base, PROTOBUF),
        "protobuf float16": ({**base, "logprob_dtype": "float16"}, PROTOBUF),
    }
    per_token, replies = {}, {}
    for name, (request_body, accept) in variants.items():
        replies[name] = post(teacher, request_body, accept=accept)
        result = decode(replies[name])
        assert result.scored_tokens == 256
        per_token[name] = len(replies[name].content) / result.scored_tokens
    print("\n".join(f"{name:22s} {b:8.1f} bytes/token" for name, b in per_token.items()))

    k = TOP_K
    assert per_token["protobuf"] <= 8 * k + 16
    assert per_token["protobuf float16"] <= 6 * k + 16
    # the arrays alone are 8k + 8 (float32) and 6k + 4 (float16) bytes a position: the rest is framing
    assert 8 * k + 8 <= per_token["protobuf"] and 6 * k + 4 <= per_token["protobuf float16"]
    # base64 is 4/3 of the raw bytes; JSON lists are larger still
    assert per_token["binary (base64 JSON)"] >= 4 / 3 * (8 * k + 8)
    assert per_token["json"] > per_token["binary (base64 JSON)"]

    # the HTTP protobuf body is byte for byte the gRPC Score reply
    proto_req = pb.ScoreRequest(
        sequences=[pb.Sequence(token_ids=text_ids, prompt_len=0)], top_k=TOP_K, logprob_dtype="float16"
    )
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    with grpc.insecure_channel(teacher.grpc_target, options) as channel:
        reply = pb_grpc.TeacherStub(channel).Score(
            proto_req, metadata=(("authorization", f"Bearer {teacher.api_key}"),), timeout=120
        )
    assert reply.SerializeToString() == replies["protobuf float16"].content
