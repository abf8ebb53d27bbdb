"""Live weight updates of a running teacher (PUT /v1/models/{name}/weights, POST .../reload, gRPC
UpdateWeights / ReloadWeights), against the real `opd serve-teacher` serving a tiny model.

What must hold: after an update the service's scores equal an in-process forward of the new weights; under
concurrent scoring during updates every answer's numbers are those of the weights version it names; a
refused update (unknown model, unknown tensor, wrong shape or dtype, truncated or oversized body, NaN,
tied tensors given two values, no key, updates off) leaves the old weights serving, bit for bit.

TOL = 1e-4 nats, the service's own bound (docs/api.md): the service and the in-process reference are
both fp32 forwards of the same weights and differ only in summation order (batched and padded, or a shared
prompt run once, vs one sequence alone). The weight sets differ from each other by much more (checked).
"""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save
from transformers import AutoModelForCausalLM
from weights_helpers import SEQUENCES, TOP_K, max_diff, reference

from helpers import start_teacher
from opd_client import GrpcTeacherClient, HttpTeacherClient
from opd_client.errors import Forbidden, InvalidRequest, NotFound, TooManyTokens, Unauthenticated
from opd_client.head import logprobs_from_hidden
from opd_client.retry import RetryPolicy
from opd_client.scores import ScoreResult

TOL = 1e-4
NO_RETRY = RetryPolicy(max_attempts=1)


# ---- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_dir):
    proc = start_teacher(
        tmp_path_factory.mktemp("live-weights"),
        [f"tiny={tiny_model_dir}"],
        extra_args=["--weight-updates", "--reload-root", str(tmp_path_factory.getbasetemp())],
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def http(service):
    with HttpTeacherClient(service.http_url, api_key=service.api_key, retry=NO_RETRY) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(service):
    with GrpcTeacherClient(service.grpc_target, api_key=service.api_key, retry=NO_RETRY) as client:
        yield client


@pytest.fixture(scope="module")
def initial(tiny_model_dir) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Every tensor moved by seeded noise; lm_head.weight left out (tied to the embedding: one tensor)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * v.abs().mean() * torch.randn(v.shape, generator=gen)
        for k, v in state.items()
        if k != "lm_head.weight"
    }


def same_bits(a: ScoreResult, b: ScoreResult) -> bool:
    return a.weights_version == b.weights_version and all(
        np.array_equal(getattr(x, key), getattr(y, key))
        for x, y in zip(a.sequences, b.sequences, strict=True)
        for key in ("token_logprobs_T", "top_ids_T_K", "top_logprobs_T_K", "tail_logprob_T")
    )


def version(client) -> int:
    (info,) = client.models()
    return info.weights_version


# ---- an update is the new weights ----------------------------------------------------------------------


def test_a_push_serves_the_pushed_weights(http, grpc_client, tiny_model_dir, initial):
    before = version(http)
    weights = perturbed(initial, seed=1)
    update = http.push_weights(save(weights), model="tiny")
    assert (update.previous_version, update.weights_version) == (before, before + 1)
    assert update.tensors == len(weights) and update.source == "push"
    assert version(http) == version(grpc_client) == before + 1
    want = reference(tiny_model_dir, weights)
    for client in (http, grpc_client):
        result = client.score(SEQUENCES, top_k=TOP_K, model="tiny")
        assert result.weights_version == before + 1
        assert max_diff(result, want) <= TOL


def test_a_partial_push_over_grpc_changes_only_what_it_names(http, grpc_client, tiny_model_dir, initial):
    base = perturbed(initial, seed=2)
    http.push_weights(save(base), model="tiny")
    changed = {"model.layers.1.mlp.down_proj.weight": base["model.layers.1.mlp.down_proj.weight"] * 1.5}
    update = grpc_client.push_weights(save(changed), model="tiny")
    assert update.tensors == 1 and update.bytes == changed["model.layers.1.mlp.down_proj.weight"].nbytes
    want = reference(tiny_model_dir, {**base, **changed})
    result = http.score(SEQUENCES, top_k=TOP_K, model="tiny")
    assert result.weights_version == update.weights_version
    assert max_diff(result, want) <= TOL
    assert max_diff(result, reference(tiny_model_dir, base)) > 100 * TOL  # the change did show


def test_reload_from_a_directory_and_a_file(http, grpc_client, tiny_model_dir, initial, tmp_path):
    weights = perturbed(initial, seed=3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.load_state_dict(weights, strict=False)
    model.save_pretrained(tmp_path / "saved")  # what a trainer writes: tied lm_head left out
    update = http.reload_weights(str(tmp_path / "saved"), model="tiny")
    assert update.source == str(tmp_path / "saved")
    assert (
        max_diff(http.score(SEQUENCES, top_k=TOP_K, model="tiny"), reference(tiny_model_dir, weights)) <= TOL
    )
    (tmp_path / "one.safetensors").write_bytes(save(initial))  # both tied names, equal values
    update = grpc_client.reload_weights(str(tmp_path / "one.safetensors"), model="tiny")
    assert update.weights_version == version(http)
    assert (
        max_diff(http.score(SEQUENCES, top_k=TOP_K, model="tiny"), reference(tiny_model_dir, initial)) <= TOL
    )


def test_the_head_follows_an_update_of_the_tied_embedding(http, tiny_model_dir, initial):
    """The served head (GET .../head, head_sha256) is rebuilt with the weights: exact logprobs from the
    hidden states and the new head equal the new model's."""
    old_sha = http.models()[0].head_sha256
    weights = perturbed(initial, seed=4)
    http.push_weights(save(weights), model="tiny")
    new_sha = http.models()[0].head_sha256
    assert new_sha != old_sha
    head = http.teacher_head("tiny")
    result = http.score(SEQUENCES[:1], top_k=TOP_K, model="tiny", return_hidden=True, hidden_dtype="float32")
    logprobs_T_V = logprobs_from_hidden(torch.from_numpy(result.sequences[0].hidden_T_D), head)
    want = reference(tiny_model_dir, weights)[0]
    top = logprobs_T_V.topk(TOP_K, dim=-1).values.numpy()
    assert float(np.max(np.abs(top - want["top_logprobs_T_K"]))) <= TOL


# ---- concurrent scoring during updates ------------------------------------------------------------------


def test_every_answer_during_updates_is_the_version_it_names(service, http, tiny_model_dir, initial):
    """Scoring threads (HTTP and gRPC) run before, during and after four pushes; each answer is compared
    with the in-process reference of the weights its weights_version names (no timing assumed: every
    thread scores once before the first push and once after the last)."""
    sets = {"a": perturbed(initial, seed=10), "b": perturbed(initial, seed=11)}
    start = version(http)
    http.push_weights(save(sets["a"]), model="tiny")
    refs = {name: reference(tiny_model_dir, state) for name, state in sets.items()}
    assert max_diff_between(refs["a"], refs["b"]) > 100 * TOL  # the versions are told apart by far
    weights_of = {start + 1: "a"}
    pushes_done = threading.Event()
    started = threading.Barrier(4)
    answers: list[ScoreResult] = []
    errors: list[BaseException] = []

    def score_loop(make_client) -> None:
        try:
            with make_client() as client:
                answers.append(client.score(SEQUENCES, top_k=TOP_K, model="tiny"))
                started.wait()
                while not pushes_done.is_set():
                    answers.append(client.score(SEQUENCES, top_k=TOP_K, model="tiny"))
                answers.append(client.score(SEQUENCES, top_k=TOP_K, model="tiny"))
        except BaseException as e:  # reported by the main thread
            errors.append(e)
            started.abort()

    clients = [
        lambda: HttpTeacherClient(service.http_url, api_key=service.api_key, retry=NO_RETRY),
        lambda: HttpTeacherClient(service.http_url, api_key=service.api_key, retry=NO_RETRY),
        lambda: GrpcTeacherClient(service.grpc_target, api_key=service.api_key, retry=NO_RETRY),
    ]
    threads = [threading.Thread(target=score_loop, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    try:
        started.wait()
        for name in ("b", "a", "b", "a"):
            update = http.push_weights(save(sets[name]), model="tiny")
            weights_of[update.weights_version] = name
    finally:
        pushes_done.set()
        for t in threads:
            t.join()
    assert not errors, errors
    seen = sorted({a.weights_version for a in answers})
    assert seen[0] == start + 1 and seen[-1] == start + 5  # before the first push, after the last
    for answer in answers:
        assert max_diff(answer, refs[weights_of[answer.weights_version]]) <= TOL, answer.weights_version


def max_diff_between(a: list[dict], b: list[dict]) -> float:
    return max(
        float(np.max(np.abs(x[key] - y[key])))
        for x, y in zip(a, b, strict=True)
        for key in ("token_logprobs_T", "top_logprobs_T_K")
    )


# ---- refused updates leave the old weights serving -----------------------------------------------------


def refusals(initial: dict[str, torch.Tensor]) -> dict[str, tuple[bytes, type, str]]:
    """name → (body, the error class, a phrase the message must hold)."""
    good = save({"model.norm.weight": initial["model.norm.weight"] * 2})
    nan = initial["model.norm.weight"].clone()
    nan[3] = float("nan")
    q = initial["model.layers.0.self_attn.q_proj.weight"]
    return {
        "unknown tensor": (save({"model.layers.9.mlp.up_proj.weight": q}), InvalidRequest, "no tensor"),
        "wrong shape": (
            save({"model.layers.0.self_attn.q_proj.weight": q[:, :64].contiguous()}),
            InvalidRequest,
            "has shape [128, 64]; the model's is [128, 128]",
        ),
        "wrong dtype": (
            save({"model.norm.weight": initial["model.norm.weight"].bfloat16()}),
            InvalidRequest,
            "is BF16; the model holds it as float32",
        ),
        "truncated data": (good[:-10], InvalidRequest, "truncated"),
        "truncated header": (good[:20], InvalidRequest, "truncated"),
        "too short": (b"\x01\x02", InvalidRequest, "too short"),
        "not safetensors": (b"\xff" * 64, InvalidRequest, "limit"),
        "non-finite": (save({"model.norm.weight": nan}), InvalidRequest, "NaN"),
        "tied, two values": (
            save(
                {
                    "model.embed_tokens.weight": initial["lm_head.weight"],
                    "lm_head.weight": initial["lm_head.weight"] + 1,
                }
            ),
            InvalidRequest,
            "tied",
        ),
    }


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_a_refused_push_leaves_the_answers_bit_identical(http, grpc_client, initial, transport):
    client = http if transport == "http" else grpc_client
    before = client.score(SEQUENCES, top_k=TOP_K, model="tiny")
    for case, (body, error, phrase) in refusals(initial).items():
        with pytest.raises(error) as refused:
            client.push_weights(body, model="tiny")
        assert phrase in refused.value.message, (case, refused.value.message)
        assert refused.value.field in ("body", "data"), case
        after = client.score(SEQUENCES, top_k=TOP_K, model="tiny")
        assert same_bits(before, after), case
        assert version(client) == before.weights_version, case
    with pytest.raises(NotFound, match="not served here"):
        client.push_weights(save({"model.norm.weight": initial["model.norm.weight"]}), model="nope")
    assert same_bits(before, client.score(SEQUENCES, top_k=TOP_K, model="tiny"))


def test_a_refused_reload_leaves_the_answers_bit_identical(http, grpc_client, tmp_path):
    before = http.score(SEQUENCES, top_k=TOP_K, model="tiny")
    (tmp_path / "empty").mkdir()
    for client in (http, grpc_client):
        for path, phrase in (
            ("relative/dir", "must be absolute"),
            (str(tmp_path / "missing"), "does not exist"),
            (str(tmp_path / "empty"), "without *.safetensors"),
            ("/etc", "outside the directory reloads may read"),
        ):
            with pytest.raises(InvalidRequest, match="path") as refused:
                client.reload_weights(path, model="tiny")
            assert phrase in refused.value.message and refused.value.field == "path"
    assert same_bits(before, http.score(SEQUENCES, top_k=TOP_K, model="tiny"))


def test_updates_need_the_key(service, http, initial):
    body = save({"model.norm.weight": initial["model.norm.weight"]})
    before = http.score(SEQUENCES, top_k=TOP_K, model="tiny")
    r = httpx.put(f"{service.http_url}/v1/models/tiny/weights", content=body)
    assert r.status_code == 401
    with (
        GrpcTeacherClient(service.grpc_target, api_key="wrong", retry=NO_RETRY) as stranger,
        pytest.raises(Unauthenticated),
    ):
        stranger.push_weights(body, model="tiny")
    assert same_bits(before, http.score(SEQUENCES, top_k=TOP_K, model="tiny"))


def test_an_oversized_body_and_updates_switched_off(tmp_path_factory, tiny_model_dir, initial):
    """--max-weights-bytes bounds a push (413 from its Content-Length, or as the bytes arrive over gRPC);
    without --weight-updates both routes answer 403, and /v1/models says so (max_weights_bytes null)."""
    body = save({"model.norm.weight": initial["model.norm.weight"] * 2})
    small = start_teacher(
        tmp_path_factory.mktemp("small-limit"),
        [f"tiny={tiny_model_dir}"],
        extra_args=["--weight-updates", "--max-weights-bytes", "256"],
    )
    off = start_teacher(tmp_path_factory.mktemp("updates-off"), [f"tiny={tiny_model_dir}"])
    try:
        with (
            HttpTeacherClient(small.http_url, api_key=small.api_key, retry=NO_RETRY) as h,
            GrpcTeacherClient(small.grpc_target, api_key=small.api_key, retry=NO_RETRY) as g,
        ):
            assert h.models()[0].max_weights_bytes == 256
            # 413 over HTTP; gRPC has no such status: INVALID_ARGUMENT, never retried either
            for client, error in ((h, TooManyTokens), (g, InvalidRequest)):
                with pytest.raises(error, match="max_weights_bytes = 256"):
                    client.push_weights(body, model="tiny")
            assert h.models()[0].weights_version == 0
        with (
            HttpTeacherClient(off.http_url, api_key=off.api_key, retry=NO_RETRY) as h,
            GrpcTeacherClient(off.grpc_target, api_key=off.api_key, retry=NO_RETRY) as g,
        ):
            info = h.models()[0]
            assert (info.weights_version, info.max_weights_bytes) == (0, None)
            for client in (h, g):
                with pytest.raises(Forbidden, match="--weight-updates"):
                    client.push_weights(body, model="tiny")
                with pytest.raises(Forbidden):
                    client.reload_weights(str(tiny_model_dir), model="tiny")
    finally:
        small.stop()
        off.stop()


def test_the_models_record_names_the_version(service, http):
    (card,) = httpx.get(
        f"{service.http_url}/v1/models", headers={"Authorization": f"Bearer {service.api_key}"}
    ).json()["data"]
    assert card["weights_version"] == version(http) and card["max_weights_bytes"] > 0


def test_the_async_client_pushes_bytes_and_files(service, http, tiny_model_dir, initial, tmp_path):
    import asyncio

    from opd_client.http_client import AsyncHttpTeacherClient

    weights = perturbed(initial, seed=5)
    (tmp_path / "w.safetensors").write_bytes(save(weights))

    async def go() -> list[int]:
        async with AsyncHttpTeacherClient(service.http_url, api_key=service.api_key, retry=NO_RETRY) as c:
            first = await c.push_weights(save(initial), model="tiny")
            second = await c.push_weights(tmp_path / "w.safetensors")  # the default teacher: tiny
            return [first.weights_version, second.weights_version]

    first, second = asyncio.run(go())
    assert second == first + 1 == version(http)
    assert (
        max_diff(http.score(SEQUENCES, top_k=TOP_K, model="tiny"), reference(tiny_model_dir, weights)) <= TOL
    )


def test_all_tensors_refuses_an_update_that_leaves_one_out(
    http, grpc_client, tiny_model_dir, initial, tmp_path
):
    """What a trainer asks for when its student must be the whole teacher: a partial body is refused,
    naming a tensor it left out; the whole model (the tied lm_head under the embedding's name) is taken."""
    partial = {k: v for k, v in perturbed(initial, seed=6).items() if "layers.1." not in k}
    (tmp_path / "partial.safetensors").write_bytes(save(partial))
    before = http.score(SEQUENCES, top_k=TOP_K, model="tiny")
    for client in (http, grpc_client):
        with pytest.raises(
            InvalidRequest, match=r"all_tensors .* 9 of the model's 39 tensors .* 'model.layers.1"
        ):
            client.push_weights(save(partial), model="tiny", all_tensors=True)
        with pytest.raises(InvalidRequest, match="all_tensors"):
            client.reload_weights(str(tmp_path / "partial.safetensors"), model="tiny", all_tensors=True)
    assert same_bits(before, http.score(SEQUENCES, top_k=TOP_K, model="tiny"))
    whole = perturbed(initial, seed=6)
    for client in (http, grpc_client):
        client.push_weights(save(whole), model="tiny", all_tensors=True)
    assert max_diff(http.score(SEQUENCES, top_k=TOP_K, model="tiny"), reference(tiny_model_dir, whole)) <= TOL
