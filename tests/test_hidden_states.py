"""Hidden-state scoring against the real service: `return_hidden` and the teacher's head give the teacher's
exact full distribution, over every transport, and the head route serves exactly the announced bytes.

Tolerances:
- FULL_TOL = 1e-4 nats on every vocabulary entry (the issue's number, as in test_score_correctness): the
  service and the in-process reference are both fp32 forwards of the same weights and differ only in
  summation order (batched and padded vs one sequence; 30 layers of length-576 reductions rounding at
  2^-24 relative); measured ~4e-5 on this CPU.
- SAME_H_TOL = 2e-5 nats: the service's own top-k logprobs vs the head formula on the very hidden states it
  returned: the only difference is the order of the D = 576 products in h · Wᵀ (nn.Linear vs a matmul),
  ≤ 576 · 2^-24 · Σ|h_d·W_vd| (~10 for this model) ≈ 3e-4 in the worst case; rounding errors of random
  sign add up as √576 rather than 576, so ~1.5e-5 is the practical bound.
- 16-bit hidden states: rounding to nearest moves each h_d by at most u·|h_d| (u = 2^-8 for bfloat16, whose
  8 significant bits leave half an ulp of 2^-8; 2^-11 for float16), plus half the smallest float16
  subnormal (2^-25) in float16's subnormal range. The logits then move by δ_v ≤ u · Σ_d |h_d·W_vd|, and
  KL(p‖q) ≤ (max δ − min δ)² / 8 (Hoeffding); the issue asks KL ≤ 1e-2 per token with bfloat16.
"""

from __future__ import annotations

import concurrent.futures
import hashlib

import grpc
import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_client import GrpcTeacherClient, HttpTeacherClient, convert, schema
from opd_client.base import make_score_request
from opd_client.head import TeacherHead, logits_from_hidden, logprobs_from_hidden
from opd_client.retry import RetryPolicy
from opd_client.v1 import teacher_pb2 as pb
from opd_client.v1 import teacher_pb2_grpc as pb_grpc
from opd_common.embedded import embedded_teacher_dir

DEFAULT = "smollm2-135m-instruct"
FULL_TOL = 1e-4
SAME_H_TOL = 2e-5
BF16_U, F16_U, F16_SUBNORMAL_HALF = 2.0**-8, 2.0**-11, 2.0**-25
KL_MAX_BF16 = 1e-2
NO_RETRY = RetryPolicy(max_attempts=1)
TRANSPORTS = ("http-protobuf", "http-binary", "http-json", "grpc", "grpc-stream")
QUESTION = "Why does the sky look blue during the day but red at sunset?"
ANSWER = (
    "Sunlight is scattered by the molecules of the air, and short blue wavelengths scatter far more than "
    "long red ones, so the sky around the sun glows blue. At sunset the light crosses much more air."
)


# ---- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    """The default teacher in this process, fp32: the direct computation every answer is checked against."""
    path = embedded_teacher_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("opd-cache")
        mp.setenv("OPD_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def http(teacher):
    with HttpTeacherClient(teacher.http_url, api_key=teacher.api_key, timeout=120, retry=NO_RETRY) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_client(teacher):
    with GrpcTeacherClient(teacher.grpc_target, api_key=teacher.api_key, timeout=120, retry=NO_RETRY) as c:
        yield c


@pytest.fixture(scope="module")
def head(http, cache_dir) -> TeacherHead:
    return http.teacher_head()


@pytest.fixture(scope="module")
def sequences(reference) -> list[dict]:
    """A chat prompt + answer, and the same answer behind a privileged teacher prefix."""
    _, tok = reference
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tok(ANSWER, add_special_tokens=False)["input_ids"][:40]
    prefix = tok("Reference answer: light scatters.\n" + prompt, add_special_tokens=False)["input_ids"]
    return [
        {"token_ids": prompt_ids + answer_ids, "prompt_len": len(prompt_ids)},
        {
            "token_ids": prompt_ids + answer_ids[:25],
            "prompt_len": len(prompt_ids),
            "teacher_prefix_ids": prefix,
        },
    ]


def reference_logprobs(reference, seq: dict, temperature: float = 1.0) -> torch.Tensor:
    """In-process fp32 full log-softmax [T, V] at the completion positions, the teacher context as served."""
    model, _ = reference
    context = seq.get("teacher_prefix_ids") or seq["token_ids"][: seq["prompt_len"]]
    completion = seq["token_ids"][seq["prompt_len"] :]
    with torch.no_grad():
        logits = model(torch.tensor([context + completion])).logits[0].float()
    rows = slice(len(context) - 1, len(context) - 1 + len(completion))
    return torch.log_softmax(logits[rows] / temperature, dim=-1)


def score(transport: str, clients, sequences, top_k: int, **kw):
    http, grpc_client = clients
    if transport.startswith("http"):
        return http.score(sequences, top_k, format=transport.removeprefix("http-"), **kw)
    if transport == "grpc":
        return grpc_client.score(sequences, top_k, **kw)
    req = make_score_request(sequences, top_k, **kw)
    [(index, outcome)] = list(grpc_client.score_stream([req]))
    assert index == 0 and not isinstance(outcome, Exception), outcome
    return outcome


def max_full_diff(
    hidden_T_D: np.ndarray, head: TeacherHead, want_T_V: torch.Tensor, temperature=1.0
) -> float:
    got = logprobs_from_hidden(hidden_T_D, head, temperature)
    assert got.shape == want_T_V.shape
    return float((got - want_T_V).abs().max())


def kl_per_token(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) per row, in float64."""
    p, q = p_logprobs.double(), q_logprobs.double()
    return (p.exp() * (p - q)).sum(-1)


# ---- the model record and the head --------------------------------------------------------------------


def test_models_record_states_everything_that_turns_h_into_logits(http, grpc_client, reference):
    model, tok = reference
    info = next(i for i in http.models() if i.name == DEFAULT)
    assert info.hidden_size == model.config.hidden_size == 576
    assert len(info.head_sha256) == 64
    assert info.logit_scale == 1.0 and info.final_logit_softcapping is None
    # V = len(tokenizer) here: no padded rows (Qwen-style padding would show as vocab_size > this)
    assert info.tokenizer_vocab_size == len(tok) == info.vocab_size
    assert {i.name: i for i in grpc_client.models()} == {i.name: i for i in http.models()}


def test_head_route_streams_exactly_the_announced_bytes(teacher, http, reference):
    info = next(i for i in http.models() if i.name == DEFAULT)
    auth = {"Authorization": f"Bearer {teacher.api_key}"}
    r = httpx.get(f"{teacher.http_url}/v1/models/{DEFAULT}/head", headers=auth, timeout=120)
    assert r.status_code == 200, r.text
    assert hashlib.sha256(r.content).hexdigest() == info.head_sha256
    assert int(r.headers["content-length"]) == len(r.content)
    assert r.headers["etag"] == f'"{info.head_sha256}"'
    tensors = load_safetensors(r.content)
    assert set(tensors) == {"weight"}  # SmolLM2's head has no bias
    model, _ = reference
    # The exact weights of the model (tied to the embedding here), as loaded: fp32 on CPU.
    assert torch.equal(tensors["weight"], model.get_output_embeddings().weight)
    # A plain safetensors save of that tensor in this process gives the same bytes: the file does not
    # depend on the process that wrote it, so every replica of a build announces the same sha256.
    mine = save_safetensors({"weight": model.get_output_embeddings().weight.detach()})
    assert hashlib.sha256(mine).hexdigest() == info.head_sha256

    cached = httpx.get(
        f"{teacher.http_url}/v1/models/{DEFAULT}/head",
        headers={**auth, "If-None-Match": r.headers["etag"]},
        timeout=60,
    )
    assert cached.status_code == 304 and cached.content == b""

    # gRPC GetHead: chunks under the 4 MiB default message size, the same bytes in order
    with grpc.insecure_channel(teacher.grpc_target) as channel:
        chunks = list(
            pb_grpc.TeacherStub(channel).GetHead(
                pb.GetHeadRequest(model=DEFAULT), metadata=(("authorization", f"Bearer {teacher.api_key}"),)
            )
        )
    assert all(c.ByteSize() < 4 * 2**20 for c in chunks) and len(chunks) > 1
    assert [c.offset for c in chunks] == list(np.cumsum([0] + [len(c.data) for c in chunks[:-1]]))
    assert b"".join(c.data for c in chunks) == r.content
    assert {(c.model, c.sha256, c.total_bytes) for c in chunks} == {
        (DEFAULT, info.head_sha256, len(r.content))
    }


def test_head_route_needs_the_key_and_a_known_model(teacher):
    url = f"{teacher.http_url}/v1/models/{DEFAULT}/head"
    r = httpx.get(url, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["param"] == "Authorization"
    r = httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert r.status_code == 401
    r = httpx.get(
        f"{teacher.http_url}/v1/models/nope/head",
        headers={"Authorization": f"Bearer {teacher.api_key}"},
        timeout=30,
    )
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    with grpc.insecure_channel(teacher.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.TeacherStub(channel).GetHead(pb.GetHeadRequest(model=DEFAULT)))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _head_downloads(teacher) -> dict[str, float]:
    """Successful head downloads so far, by face, from the service's own counters."""
    text = httpx.get(f"{teacher.http_url}/metrics", timeout=30).text
    counts = {"http": 0.0, "grpc": 0.0}
    for line in text.splitlines():
        if line.startswith("opd_requests_total{") and 'code="200"' in line and "/head" in line:
            counts["http"] += float(line.rsplit(" ", 1)[1])
        if line.startswith("opd_requests_total{") and 'endpoint="grpc:GetHead"' in line and '"OK"' in line:
            counts["grpc"] += float(line.rsplit(" ", 1)[1])
    return counts


async def test_teacher_head_downloads_once_caches_by_sha_and_verifies(
    teacher, http, grpc_client, head, cache_dir
):
    from opd_client import AsyncHttpTeacherClient

    info = next(i for i in http.models() if i.name == DEFAULT)
    path = cache_dir / "heads" / f"{info.head_sha256}.safetensors"
    assert path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == info.head_sha256
    assert head.sha256 == info.head_sha256 and head.weight_V_D.shape == (info.vocab_size, 576)

    before = _head_downloads(teacher)
    again = http.teacher_head(DEFAULT)  # cached: no request to the head route
    async with AsyncHttpTeacherClient(teacher.http_url, api_key=teacher.api_key, retry=NO_RETRY) as client:
        also = await client.teacher_head()
    from_grpc = grpc_client.teacher_head()
    assert _head_downloads(teacher) == before
    for h in (again, also, from_grpc):
        assert torch.equal(h.weight_V_D, head.weight_V_D)

    # A corrupted cache file is never trusted: it is fetched again (over each transport) and verified.
    for fetch, face in ((http.teacher_head, "http"), (grpc_client.teacher_head, "grpc")):
        path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
        fresh = fetch()
        assert torch.equal(fresh.weight_V_D, head.weight_V_D)
        before[face] += 1
        assert _head_downloads(teacher) == before
    async with AsyncHttpTeacherClient(teacher.http_url, api_key=teacher.api_key, retry=NO_RETRY) as client:
        path.unlink()
        fresh = await client.teacher_head(DEFAULT)
    before["http"] += 1
    assert _head_downloads(teacher) == before and path.exists()

    tiny = http.teacher_head("tiny")  # a second teacher: its own head, its own file
    assert tiny.hidden_size == 128 and tiny.sha256 != head.sha256


# ---- exactness ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_fp32_hidden_states_give_the_full_distribution(
    transport, http, grpc_client, head, sequences, reference
):
    result = score(transport, (http, grpc_client), sequences, 0, return_hidden=True, hidden_dtype="float32")
    assert result.hidden_dtype == "float32" and result.model == DEFAULT
    for seq, got in zip(sequences, result.sequences, strict=True):
        T = len(seq["token_ids"]) - seq["prompt_len"]
        # top_k = 0: no logprobs at all, only the hidden states
        assert got.token_logprobs_T is None and got.top_ids_T_K is None and got.tail_logprob_T is None
        assert got.hidden_T_D.dtype == np.float32 and got.hidden_T_D.shape == (T, 576)
        assert got.num_tokens == T
        assert max_full_diff(got.hidden_T_D, head, reference_logprobs(reference, seq)) <= FULL_TOL


def test_hidden_states_do_not_depend_on_temperature_and_the_top_k_part_does(http, head, sequences, reference):
    plain = http.score(sequences, 20, return_hidden=True, hidden_dtype="float32")
    hot = http.score(sequences, 20, return_hidden=True, hidden_dtype="float32", temperature=0.7)
    for seq, a, b in zip(sequences, plain.sequences, hot.sequences, strict=True):
        np.testing.assert_array_equal(a.hidden_T_D, b.hidden_T_D)
        assert max_full_diff(b.hidden_T_D, head, reference_logprobs(reference, seq, 0.7), 0.7) <= FULL_TOL
        for scores, temperature in ((a, 1.0), (b, 0.7)):
            # the service's top-k from the same h: the client's formula is the service's definition
            mine = logprobs_from_hidden(scores.hidden_T_D, head, temperature)
            top = mine.topk(20, dim=-1).values.numpy()
            np.testing.assert_allclose(scores.top_logprobs_T_K, top, atol=SAME_H_TOL, rtol=0)
            token = mine.gather(1, torch.tensor(seq["token_ids"][seq["prompt_len"] :])[:, None])[:, 0]
            np.testing.assert_allclose(scores.token_logprobs_T, token.numpy(), atol=SAME_H_TOL, rtol=0)
        assert np.max(np.abs(a.top_logprobs_T_K - b.top_logprobs_T_K)) > 0.01  # temperature changed them


def _forward_tokens(teacher) -> float:
    """Tokens the default teacher ran through its model so far (a shared prompt counts once)."""
    text = httpx.get(f"{teacher.http_url}/metrics", timeout=30).text
    line = next(
        x for x in text.splitlines() if x.startswith(f'opd_forward_tokens_total{{model="{DEFAULT}"}}')
    )
    return float(line.rsplit(" ", 1)[1])


def test_shared_prompt_batches_return_each_members_hidden_states(teacher, http, head, sequences, reference):
    base = sequences[0]
    prompt = base["token_ids"][: base["prompt_len"]]
    completion = base["token_ids"][base["prompt_len"] :]
    rollouts = [
        {"token_ids": prompt + completion[: 10 + 7 * g], "prompt_len": len(prompt)} for g in range(4)
    ] + [sequences[1]]
    before = _forward_tokens(teacher)
    result = http.score(rollouts, 5, return_hidden=True, hidden_dtype="float32")
    # the four rollouts' prompt ran once (the shared-prompt path), the fifth sequence in full
    assert _forward_tokens(teacher) - before < result.forward_tokens - 3 * len(prompt)
    for seq, got in zip(rollouts, result.sequences, strict=True):
        assert got.hidden_T_D.shape == (len(seq["token_ids"]) - len(prompt), 576)
        assert max_full_diff(got.hidden_T_D, head, reference_logprobs(reference, seq)) <= FULL_TOL


@pytest.mark.parametrize(
    ("dtype", "u"), [("bfloat16", BF16_U), ("float16", F16_U)], ids=["bfloat16", "float16"]
)
@pytest.mark.parametrize("transport", ["http-protobuf", "http-binary", "http-json", "grpc"])
def test_16_bit_hidden_states(transport, dtype, u, http, grpc_client, head, sequences, reference):
    clients = (http, grpc_client)
    exact = score(transport, clients, sequences, 0, return_hidden=True, hidden_dtype="float32")
    half = score(transport, clients, sequences, 0, return_hidden=True, hidden_dtype=dtype)
    assert half.hidden_dtype == dtype
    for seq, h32, h16 in zip(sequences, exact.sequences, half.sequences, strict=True):
        x32, x16 = h32.hidden_T_D.astype(np.float64), h16.hidden_T_D.astype(np.float64)
        bound = u * np.abs(x32) + (F16_SUBNORMAL_HALF if dtype == "float16" else 0.0)
        assert np.all(np.abs(x16 - x32) <= bound), float(np.max(np.abs(x16 - x32) - bound))
        want = reference_logprobs(reference, seq)
        kl = kl_per_token(want, logprobs_from_hidden(h16.hidden_T_D, head))
        assert float(kl.max()) <= KL_MAX_BF16, float(kl.max())


def test_bytes_per_scored_token_with_bf16_hidden_states(teacher, sequences):
    """Protobuf answers cost 2·D bytes per scored token plus a per-sequence envelope (≤ 2·D + 16)."""
    seq = sequences[0]
    scored = len(seq["token_ids"]) - seq["prompt_len"]
    headers = {"Authorization": f"Bearer {teacher.api_key}", "Accept": "application/x-protobuf"}
    for dtype, itemsize in (("bfloat16", 2), ("float32", 4)):
        body = {"sequences": [seq], "top_k": 0, "return_hidden": True, "hidden_dtype": dtype}
        r = httpx.post(f"{teacher.http_url}/v1/score", json=body, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        msg = pb.ScoreResponse.FromString(r.content)
        assert msg.sequences[0].hidden.dtype == dtype
        assert len(msg.sequences[0].hidden.data) == itemsize * 576 * scored
        assert len(r.content) / scored <= itemsize * 576 + 16, len(r.content) / scored
        with grpc.insecure_channel(teacher.grpc_target) as channel:
            reply = pb_grpc.TeacherStub(channel).Score(
                convert.score_request_to_proto(schema.ScoreRequest(**body)),
                metadata=(("authorization", f"Bearer {teacher.api_key}"),),
            )
        assert reply.ByteSize() == len(r.content)


def test_concurrent_requests_mixing_hidden_and_plain_get_what_they_asked(
    http, grpc_client, head, sequences, reference
):
    """Eight requests at once over both transports (they may share forwards): each answer is its own."""
    wants = [reference_logprobs(reference, s) for s in sequences]
    asks = [(True, 0), (True, 20), (False, 20)] * 3  # (return_hidden, top_k)

    def one(i: int):
        return_hidden, top_k = asks[i]
        client = http if i % 2 else grpc_client
        dtype = "float32" if return_hidden else None  # hidden_dtype alone is refused (a forgotten flag)
        return client.score(sequences, top_k, return_hidden=return_hidden, hidden_dtype=dtype)

    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        results = list(pool.map(one, range(len(asks))))
    for (return_hidden, top_k), result in zip(asks, results, strict=True):
        assert result.hidden_dtype == ("float32" if return_hidden else None)
        for want, got in zip(wants, result.sequences, strict=True):
            assert (got.hidden_T_D is not None) == return_hidden
            assert (got.top_logprobs_T_K is not None) == (top_k > 0)
            if return_hidden:
                assert max_full_diff(got.hidden_T_D, head, want) <= FULL_TOL
            if top_k:
                assert got.top_logprobs_T_K.shape == (len(want), top_k)
                np.testing.assert_allclose(
                    got.top_logprobs_T_K, want.topk(top_k, -1).values.numpy(), atol=FULL_TOL, rtol=0
                )


def test_logits_from_hidden_keeps_the_model_dtype_optional(head, http, sequences):
    """A trainer may move the head to its device/dtype once; fp32 logits from either are the same."""
    got = http.score(sequences[:1], 0, return_hidden=True, hidden_dtype="float32").sequences[0]
    moved = head.to("cpu", torch.float32)
    assert torch.equal(logits_from_hidden(got.hidden_T_D, moved), logits_from_hidden(got.hidden_T_D, head))


# ---- bad inputs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": 0, "return_hidden": False}, "top_k"),
        ({"top_k": 5, "return_hidden": True, "hidden_dtype": "int8"}, "hidden_dtype"),
        ({"top_k": 5, "hidden_dtype": "float32"}, "hidden_dtype"),
        ({"top_k": 0, "return_hidden": True, "score_ids": [[[1]] * 40]}, "score_ids"),
    ],
    ids=["top_k-0-alone", "top_k-0-no-hidden", "unknown-dtype", "dtype-without-hidden", "score_ids-with-0"],
)
def test_bad_hidden_requests_get_400_naming_the_field(teacher, http, grpc_client, sequences, extra, field):
    body = {"sequences": sequences[:1], **extra}
    r = httpx.post(
        f"{teacher.http_url}/v1/score",
        json=body,
        headers={"Authorization": f"Bearer {teacher.api_key}"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field, r.json()
    with grpc.insecure_channel(teacher.grpc_target) as channel, pytest.raises(grpc.RpcError) as e:
        pb_grpc.TeacherStub(channel).Score(
            convert.score_request_to_proto(schema.ScoreRequest(**body)),
            metadata=(("authorization", f"Bearer {teacher.api_key}"),),
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(e.value.trailing_metadata())["opd-field"] == field
    # and the service keeps serving
    assert http.score(sequences[:1], 0, return_hidden=True).sequences[0].hidden_T_D.shape[1] == 576
