"""The black-box teacher: chunk arithmetic, similarity, the chunk loss, and /v1/chunk-score + gRPC ChunkScore
+ `opd train --loss chunk` against a real third-party OpenAI-compatible server (llama-cpp-python serving
the default teacher's GGUF)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
from blackbox_helpers import API_MODEL, completion, start_llama_server
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import make_tiny_model, start_teacher
from opd_client import GrpcTeacherClient, HttpTeacherClient, convert, schema
from opd_common.embedded import embedded_teacher_dir
from opd_student import losses
from opd_student.distributed import opd_command
from opd_student.metrics_log import read_metrics
from opd_student.signals.chunk_rewards import token_pieces
from opd_teacher.blackbox.chat_template import ChatTemplate
from opd_teacher.blackbox.chunks import TeacherToken, pick_chunks, smoothed_reward, verify_chunk
from opd_teacher.blackbox.similarity import edit_similarity, embedding_model_dir

QUESTION = [{"role": "user", "content": "Give me three tips for staying healthy."}]


# ---- pure functions -----------------------------------------------------------------------------------


def test_even_chunks_split_the_completion_into_equal_segments():
    assert pick_chunks(20, 4, 3) == [(0, 3), (5, 8), (10, 13), (15, 18)]
    assert pick_chunks(20, 2, 15) == [(0, 10), (10, 20)]  # cut where the next chunk starts
    assert pick_chunks(3, 5, 2) == [(0, 1), (1, 2), (2, 3)]  # fewer tokens than chunks
    assert pick_chunks(0, 4, 8) == []


def test_entropy_chunks_start_at_the_most_uncertain_tokens_without_overlap():
    entropies = [0.1, 0.2, 3.0, 2.9, 0.1, 0.1, 0.1, 2.0, 0.3, 2.5]
    # 2 (3.0) is taken; 3 (2.9) falls inside [2, 6); 9 (2.5) starts one cut at the end; 7 (2.0) is cut at 9.
    assert pick_chunks(10, 3, 4, entropies) == [(2, 6), (7, 9), (9, 10)]
    with pytest.raises(ValueError, match="3 entropies for 10"):
        pick_chunks(10, 3, 4, entropies[:3])


def test_smoothed_reward_is_the_beta_prior_estimate():
    assert smoothed_reward(3, 4, 0.5, 1.0) == pytest.approx((3 + 0.5) / 5)
    assert smoothed_reward(0, 4, 0.5, 0.0) == 0.0
    assert smoothed_reward(0, 0, 0.3, 2.0) == pytest.approx(0.3)  # no samples: the prior


def _levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


@pytest.mark.parametrize(
    "a,b",
    [
        ("kitten", "sitting"),
        ("", ""),
        ("", "abc"),
        ("Paris is big", "Paris is the capital"),
        ("é日本", "e日"),
    ],
)
def test_edit_similarity_matches_a_direct_levenshtein(a, b):
    expected = 1.0 if not (a or b) else 1 - _levenshtein(a, b) / max(len(a), len(b))
    assert edit_similarity(a, b) == pytest.approx(expected, abs=1e-12)


def test_verification_accepts_the_matching_prefix_and_reads_teacher_logprobs():
    pieces = [" The", " cat", " sat", " down", "."]
    tokens = [
        TeacherToken(" The", -0.1, {" The": -0.1, " A": -2.5}),
        TeacherToken(" cat", -0.3, {" cat": -0.3, " dog": -1.5}),
        TeacherToken(" lay", -0.7, {" lay": -0.7, " sat": -0.9}),
        TeacherToken(" down", -0.2, {" down": -0.2}),
    ]
    v = verify_chunk(pieces, " The cat lay down", tokens, stopped=False, ends_completion=False)
    assert v.accepted_tokens == 2
    # accepted ones and the first rejected one (" sat" is in the teacher's top-k there); later: unknown
    assert v.token_logprobs == [-0.1, -0.3, -0.9, None, None]
    # a repeat of the prefix cut from the greedy text shifts the teacher tokens' positions
    shifted = [TeacherToken("Hi", -0.05, {"Hi": -0.05}), *tokens]
    v = verify_chunk(pieces, " The cat lay down", shifted, stopped=False, ends_completion=False, skip_chars=2)
    assert v.token_logprobs[:3] == [-0.1, -0.3, -0.9]


def test_verification_of_a_final_eos_needs_the_teacher_to_stop_there():
    pieces = [" yes", "."]
    assert verify_chunk([*pieces, ""], " yes.", None, stopped=True, ends_completion=True).accepted_tokens == 3
    assert (
        verify_chunk([*pieces, ""], " yes.", None, stopped=False, ends_completion=True).accepted_tokens == 2
    )
    assert (
        verify_chunk([*pieces, ""], " yes. No", None, stopped=True, ends_completion=True).accepted_tokens == 2
    )


def test_token_pieces_concatenate_to_the_text_and_keep_characters_whole():
    tokenizer = AutoTokenizer.from_pretrained(embedded_teacher_dir())
    text = "Café — 日本語 ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    pieces = token_pieces(tokenizer, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text and pieces[-1] == ""
    assert all("\ufffd" not in p for p in pieces)


def test_chunk_messages_survive_json_and_proto():
    req = schema.ChunkScoreRequest(
        messages=QUESTION, completion=["a", " b", ""], entropies=[0.5, 1, 2.25], num_samples=3, alpha=0
    )
    back = convert.chunk_request_from_proto(convert.chunk_request_to_proto(req))
    assert back == req
    unset = convert.chunk_request_from_proto(convert.chunk_request_to_proto(req).__class__(completion=["x"]))
    assert (unset.num_chunks, unset.similarity_threshold, unset.entropies) == (4, 0.7, None)
    chunk = schema.ChunkScore(
        start=0, end=2, text="a b", similarity=0.5, similarity_max=0.75, edit_similarity=0.25,
        edit_similarity_max=0.5, matches=1, reward=0.375, accepted_tokens=1, token_logprobs=[-0.5, None],
        greedy="a c", samples=["x", "y"],
    )  # fmt: skip
    resp = schema.ChunkScoreResponse(model="m", chunks=[chunk], usage=schema.ApiUsage(requests=3, retries=1))
    assert convert.chunk_response_from_proto(convert.chunk_response_to_proto(resp)) == resp


# ---- the chunk loss -----------------------------------------------------------------------------------


def test_chunk_weighted_nll_and_kl_to_reference_equal_direct_sums():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    log_q = torch.log_softmax(logits, -1)
    log_r = torch.log_softmax(torch.randn(2, 5, 7), -1)
    targets = torch.randint(0, 7, (2, 5))
    q_tok = log_q.gather(-1, targets[..., None])[..., 0]
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    chunk = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 0, 0, 1]], dtype=torch.float32)
    weights = torch.tensor([[9.0, 0.5, 0.5, 9.0, 9.0], [-0.25, -0.25, 9.0, 9.0, 0.75]])
    nll = losses.chunk_weighted_nll(q_tok, weights, chunk)
    kl = losses.reverse_kl_to_reference(log_q, log_r, mask * (1 - chunk))
    log_q, q_tok = log_q.detach(), q_tok.detach()
    for b in range(2):
        for t in range(5):
            expected_nll = -weights[b, t] * q_tok[b, t] if chunk[b, t] else 0.0
            assert float(nll[b, t].detach()) == pytest.approx(float(expected_nll), abs=1e-6)
            direct = sum(math.exp(log_q[b, t, v]) * (log_q[b, t, v] - log_r[b, t, v]) for v in range(7))
            outside = mask[b, t] and not chunk[b, t]
            assert float(kl[b, t].detach()) == pytest.approx(float(direct) if outside else 0.0, abs=1e-6)
    (nll.sum() + kl.sum()).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


# ---- against a real OpenAI-compatible server ----------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    server = start_llama_server(tmp_path_factory.mktemp("llama"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def blackbox(llama, tmp_path_factory):
    """`opd serve-teacher --backend openai` in front of the llama-cpp-python server."""
    teacher = start_teacher(
        tmp_path_factory.mktemp("blackbox"),
        models=[],
        extra_args=["--backend", "openai", "--api-base", llama.base_url, "--api-model", API_MODEL],
    )
    yield teacher
    teacher.stop()


@pytest.fixture(scope="module")
def greedy_answer(llama):
    """The teacher's own greedy answer, token by token, with its logprobs, straight from the API's raw-text
    endpoint on the ChatML prompt (what `auto` picks on this server)."""
    prompt = ChatTemplate.load(None).render(QUESTION, "")
    answer = completion(
        llama.base_url, prompt, max_tokens=10, temperature=0.0, logprobs=5, stop=["<|im_end|>"]
    )
    return answer["tokens"]


def test_black_box_teacher_lists_itself_and_refuses_white_box_scoring(blackbox):
    with HttpTeacherClient(blackbox.http_url, api_key=blackbox.api_key) as client:
        (info,) = client.models()
        assert info.black_box and info.name == API_MODEL and info.max_top_k == 20
        assert info.source.endswith("prefill completions"), info.source  # auto's choice on this server
    assert "--api-prefill auto: completions" in blackbox.log()
    r = httpx.post(
        f"{blackbox.http_url}/v1/score",
        json={"sequences": [{"token_ids": [1, 2, 3], "prompt_len": 1}], "top_k": 2},
        headers={"Authorization": f"Bearer {blackbox.api_key}"},
    )
    assert r.status_code == 400 and "/v1/chunk-score" in r.json()["error"]["message"]


def test_chunk_score_accepts_the_teachers_own_greedy_answer(blackbox, greedy_answer):
    """The student's chunk at the start IS the teacher's greedy answer: every token is accepted, with the
    teacher's own logprobs; a changed token is where acceptance stops."""
    pieces = [t["token"] for t in greedy_answer]
    request = {
        "messages": QUESTION,
        "completion": pieces,
        "num_chunks": 1,
        "chunk_tokens": 6,
        "num_samples": 2,
    }
    with HttpTeacherClient(blackbox.http_url, api_key=blackbox.api_key) as client:
        (chunk,) = client.chunk_score(request).chunks
        assert (chunk.start, chunk.end, chunk.accepted_tokens) == (0, 6, 6)
        np.testing.assert_allclose(chunk.token_logprobs, [t["logprob"] for t in greedy_answer[:6]], atol=2e-3)
        changed = [*pieces[:3], " banana", *pieces[4:]]
        (chunk,) = client.chunk_score({**request, "completion": changed}).chunks
    assert chunk.accepted_tokens == 3
    np.testing.assert_allclose(chunk.token_logprobs[:3], [t["logprob"] for t in greedy_answer[:3]], atol=2e-3)
    alternatives = {a["token"]: a["logprob"] for a in greedy_answer[3]["top_logprobs"]}
    assert chunk.token_logprobs[3] == (
        pytest.approx(alternatives[" banana"], abs=2e-3) if " banana" in alternatives else None
    )
    assert chunk.token_logprobs[4:] == [None, None]


def test_the_teacher_continues_the_students_exact_prefix(blackbox, greedy_answer):
    """A chunk in the middle of the teacher's own greedy answer: the teacher, given the answer's first 5
    tokens as the start of its turn, writes the 6th itself, with about the logprob it gave it in its own
    pass. About: llama.cpp runs a prompt in batches and generated tokens one at a time, through other
    kernels, so the two passes differ by up to ~0.1 nats here, enough to flip a later near-tie, which is
    why only the first token is held to the teacher's. With instruct the prefix is only quoted inside an
    instruction, and the teacher starts its answer over ("1. ...")."""
    pieces = [t["token"] for t in greedy_answer[:10]]
    request = {
        "messages": QUESTION,
        "completion": pieces,
        "num_chunks": 2,
        "chunk_tokens": 3,
        "num_samples": 1,
    }
    with HttpTeacherClient(blackbox.http_url, api_key=blackbox.api_key) as client:
        first, middle = client.chunk_score(request).chunks
    assert [(c.start, c.end) for c in (first, middle)] == [(0, 3), (5, 8)]
    assert first.accepted_tokens == 3 and middle.accepted_tokens >= 1, (first, middle)
    assert middle.token_logprobs[0] == pytest.approx(greedy_answer[5]["logprob"], abs=0.25)


def test_chunk_score_similarities_equal_a_direct_computation(blackbox):
    from sentence_transformers import SentenceTransformer

    completion = [
        "Drink",
        " plenty",
        " of",
        " water",
        ",",
        " sleep",
        " eight",
        " hours",
        " and",
        " walk",
        " daily",
        ".",
    ]
    request = schema.ChunkScoreRequest(
        messages=QUESTION, completion=completion, num_chunks=2, chunk_tokens=4, num_samples=3,
        similarity_threshold=0.3, prior=0.4, alpha=2, return_samples=True,
    )  # fmt: skip
    with HttpTeacherClient(blackbox.http_url, api_key=blackbox.api_key) as client:
        answer = client.chunk_score(request)
    assert [(c.start, c.end) for c in answer.chunks] == [(0, 4), (6, 10)]
    # llama-cpp-python answers one choice whatever n: N sample calls + 1 greedy call per chunk
    assert answer.usage.requests == 2 * (3 + 1) and answer.usage.completion_tokens > 0
    model = SentenceTransformer(str(embedding_model_dir()), device="cpu")
    for c in answer.chunks:
        assert c.text == "".join(completion[c.start : c.end]) and len(c.samples) == 3
        vectors = model.encode([c.text, *c.samples])
        cos = [
            float(np.dot(vectors[0], v) / np.linalg.norm(vectors[0]) / np.linalg.norm(v)) for v in vectors[1:]
        ]
        cos = [x if s.strip() else 0.0 for x, s in zip(cos, c.samples, strict=True)]
        edit = [1 - _levenshtein(c.text, s) / max(len(c.text), len(s), 1) for s in c.samples]
        assert c.similarity == pytest.approx(np.mean(cos), abs=1e-4)
        assert c.similarity_max == pytest.approx(max(cos), abs=1e-4)
        assert c.edit_similarity == pytest.approx(np.mean(edit), abs=1e-9)
        assert c.matches == sum(x >= 0.3 for x in cos)
        assert c.reward == pytest.approx((c.matches + 2 * 0.4) / (3 + 2))


def test_grpc_chunk_score_gives_the_same_chunks_and_errors(blackbox, greedy_answer):
    pieces = [t["token"] for t in greedy_answer]
    request = {
        "messages": QUESTION,
        "completion": pieces,
        "num_chunks": 2,
        "chunk_tokens": 3,
        "num_samples": 1,
    }
    with GrpcTeacherClient(blackbox.grpc_target, api_key=blackbox.api_key) as grpc_client:
        via_grpc = grpc_client.chunk_score(request)
        with pytest.raises(Exception, match="entropies has 2 values for 10"):
            grpc_client.chunk_score({**request, "entropies": [1.0, 2.0]})
    with HttpTeacherClient(blackbox.http_url, api_key=blackbox.api_key) as client:
        via_http = client.chunk_score(request)
    # The chunks, not the teacher's greedy words: llama.cpp reuses the cached states of the previous prompt's
    # common prefix and runs the rest through other kernels, which can flip a near-tie in a greedy answer.
    key = [(c.start, c.end, c.text) for c in via_grpc.chunks]
    assert key == [(c.start, c.end, c.text) for c in via_http.chunks]
    assert all(c.greedy and c.accepted_tokens >= 1 for c in [*via_grpc.chunks, *via_http.chunks])
    assert via_grpc.usage.requests == via_http.usage.requests == 2 * (1 + 1)


def test_chunk_score_errors_name_the_field(blackbox):
    headers = {"Authorization": f"Bearer {blackbox.api_key}"}
    base = {"messages": QUESTION, "completion": ["a", "b"]}
    for extra, field in (
        ({"num_samples": -1}, "num_samples"),
        ({"continuation_tokens": 0}, "continuation_tokens"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"completion": []}, "completion"),
    ):
        r = httpx.post(f"{blackbox.http_url}/v1/chunk-score", json={**base, **extra}, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("student") / "tiny", layers=2, seed=1)


def _train(
    blackbox, student, out, *args: str, procs: int = 1, threads: str | None = None
) -> subprocess.CompletedProcess:
    """`opd train` against the black-box teacher service, with its key (under torchrun when procs > 1)."""
    cmd = [*opd_command(procs), "train", "--teacher-url", blackbox.http_url]
    cmd += ["--student", str(student), "--out", str(out), *args]
    env = {**os.environ, "OPD_TEACHER_API_KEY": blackbox.api_key}
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_train_chunk_loss_runs_through_the_real_api_and_logs_api_tokens(
    blackbox, teacher, tiny_student, tmp_path
):
    """Also: --eval-teacher-url puts the held-out KL to a white-box service beside the chunk reward, equal to
    `opd eval` of the same student against that service; --api-*-price turn the API's tokens into a cost.
    No KD term, so the teacher's greedy answer covers the chunk only (--chunk-continuation-tokens 0)."""
    out = tmp_path / "run"
    r = _train(
        blackbox, tiny_student, out, "--loss", "chunk", "--steps", "2",
        "--prompts-per-step", "2", "--samples-per-prompt", "1", "--max-new-tokens", "8",
        "--chunk-num", "2", "--chunk-tokens", "3", "--chunk-samples", "2", "--no-chunk-baseline",
        "--chunk-continuation-tokens", "0",
        "--eval-num-prompts", "2", "--eval-max-new-tokens", "6", "--lr", "1e-2",
        "--eval-teacher-url", teacher.http_url, "--api-prompt-price", "0.5", "--api-completion-price", "1.5",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    records = read_metrics(out / "metrics.jsonl")
    steps = [x for x in records if not x.get("eval")]
    assert [x["step"] for x in steps] == [1, 2]
    for x in steps:
        # every chunk costs N sample calls + 1 greedy call at llama-cpp-python (one choice per call)
        assert x["api/requests"] == x["chunk/chunks"] * (2 + 1) and x["api/tokens"] > 0
        assert 0 < x["chunk/reward"] < 1 and 0 < x["chunk/token_fraction"] <= 1
        expected_cost = (x["api/prompt_tokens"] * 0.5 + x["api/completion_tokens"] * 1.5) / 1e6
        assert x["api/cost"] == pytest.approx(expected_cost, rel=1e-12)
    evals = [x for x in records if x.get("eval")]
    assert [x["step"] for x in evals] == [0, 2] and all(x["eval/api_tokens"] > 0 for x in evals)
    assert "white-box sampled reverse KL" in r.stdout
    direct = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "opd_cli.main", "eval", "--teacher-url", teacher.http_url, "--student",
           str(tiny_student), "--num-prompts", "2", "--max-new-tokens", "6", "--json-out", str(direct)]  # fmt: skip
    e = subprocess.run(
        cmd, env={**os.environ, "OPD_TEACHER_API_KEY": teacher.api_key}, capture_output=True, text=True
    )
    assert e.returncode == 0, e.stderr[-3000:]
    expected = json.loads(direct.read_text())
    for key in ("eval/reverse_kl", "eval/topk_forward_kl", "eval/tokens"):
        assert evals[0][key] == pytest.approx(expected[key], abs=1e-4), key
    # positive chunk weights (no baseline) and a large lr: the student moved
    before = AutoModelForCausalLM.from_pretrained(tiny_student).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert json.loads((out / "config.json").read_text())["loss"] == "chunk"


@pytest.mark.slow
def test_train_chunk_loss_on_two_ranks_takes_the_one_process_steps(blackbox, tiny_student, tmp_path):
    """With a greedy teacher (temperature 0: its continuations do not depend on the run) 2 FSDP2 ranks,
    each scoring half the rollouts, take the steps of 1 process: same chunks, rewards, baseline and loss.
    The KD term is off here: llama.cpp's logprobs move by up to ~0.1 nats between calls (it reuses the
    cached states of the previous prompt), so the two runs' teacher distributions need not agree; the KD
    term under 2 ranks is tests/test_blackbox_kd.py's, and with it off the teacher's greedy answer need
    only cover the chunk (--chunk-continuation-tokens 0: chunk_tokens, not 64 tokens a call at llama.cpp)."""
    settings = [
        "--loss", "chunk", "--steps", "2", "--prompts-per-step", "2", "--samples-per-prompt", "2",
        "--max-new-tokens", "8", "--micro-batch-size", "2", "--chunk-num", "2", "--chunk-tokens", "3",
        "--chunk-samples", "2", "--chunk-teacher-temperature", "0", "--chunk-kl-coef", "0.1",
        "--chunk-kd-coef", "0", "--chunk-continuation-tokens", "0",
        "--eval-num-prompts", "2", "--eval-max-new-tokens", "6", "--lr", "1e-2",
    ]  # fmt: skip
    runs = {}
    for procs in (1, 2):
        out = tmp_path / f"procs-{procs}"
        r = _train(blackbox, tiny_student, out, *settings, procs=procs, threads="1")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        runs[procs] = read_metrics(out / "metrics.jsonl")
    one, two = runs[1], runs[2]
    assert [x["step"] for x in two] == [x["step"] for x in one] == [0, 1, 2, 2]  # eval, 2 steps, eval
    for ref, got in zip(one, two, strict=True):
        exact = [k for k in ref if k.endswith(("chunks", "tokens", "rollouts", "eval/prompts"))]
        for key in exact:
            assert got[key] == ref[key], (key, ref, got)
        for key in ("loss", "chunk/reward", "chunk/baseline", "kl/initial", "eval/chunk_reward"):
            if key in ref:
                assert got[key] == pytest.approx(ref[key], abs=1e-5), (key, ref, got)
    assert one[1]["chunk/chunks"] == 4 * 2 and one[1]["chunk/baseline"] != 0  # 4 rollouts, 2 chunks each


def test_train_with_a_logprob_loss_against_a_black_box_teacher_is_a_clear_error(
    blackbox, tiny_student, tmp_path
):
    r = _train(blackbox, tiny_student, tmp_path / "run", "--loss", "reverse_kl")
    assert r.returncode != 0 and "is black-box" in r.stderr and "--loss chunk" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "--backend openai needs --api-base URL and --api-model NAME"),
        (["--api-base", "http://127.0.0.1:9/v1", "--api-model", "m", "--api-key-env", "OPD_NO_SUCH_VAR"],
         "--api-key-env OPD_NO_SUCH_VAR: that environment variable is not set"),
        (["--api-base", "http://127.0.0.1:9/v1", "--api-model", "m", "--api-max-attempts", "1"],
         "cannot reach the teacher API at http://127.0.0.1:9/v1/chat/completions"),
    ],
)  # fmt: skip
def test_serve_teacher_openai_flag_and_start_up_errors_are_clear(args, message):
    cmd = [sys.executable, "-m", "opd_cli.main", "serve-teacher", "--backend", "openai", "--port", "0", *args]
    env = {k: v for k, v in os.environ.items() if k != "OPD_NO_SUCH_VAR"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
