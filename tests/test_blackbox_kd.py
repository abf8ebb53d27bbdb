"""The black-box teacher's own distributions as a training signal, against the real llama-cpp-python server:
/v1/chunk-score returns each chunk's greedy continuation with the API's top logprobs, and `opd train --loss
chunk --chunk-kd-coef` distils them at the student's prefixes (signals/continuation_kd.py)."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from blackbox_helpers import API_MODEL, completion, start_llama_server
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import make_tiny_model, start_teacher
from opd_client import GrpcTeacherClient, HttpTeacherClient
from opd_common.embedded import embedded_teacher_dir
from opd_student.distributed import opd_command
from opd_student.metrics_log import read_metrics
from opd_student.signals.chunk_rewards import token_pieces
from opd_teacher.blackbox.chat_template import ChatTemplate

QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    server = start_llama_server(tmp_path_factory.mktemp("llama"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def blackbox(llama, tmp_path_factory):
    teacher = start_teacher(
        tmp_path_factory.mktemp("blackbox"),
        models=[],
        extra_args=["--backend", "openai", "--api-base", llama.base_url, "--api-model", API_MODEL],
    )
    yield teacher
    teacher.stop()


def test_chunk_score_returns_the_continuation_the_api_gives_with_its_top_logprobs(llama, blackbox):
    """A chunk at token 4 of a student answer: with num_samples 0 the only call is the greedy continuation
    of the student's exact 4-token prefix, continuation_tokens long, and teacher_tokens are that call's
    tokens and top-20 logprobs as the API gives them for the same prompt."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_teacher_dir())
    pieces = token_pieces(tokenizer, tokenizer.encode("Red, orange and yellow are three of them."))
    request = {
        "messages": QUESTION, "completion": pieces, "num_chunks": 1, "chunk_tokens": 3, "num_samples": 0,
        "entropies": [0.0] * 4 + [9.0] + [0.0] * (len(pieces) - 5), "top_logprobs": 20,
        "continuation_tokens": 6, "return_teacher_tokens": True,
    }  # fmt: skip
    with HttpTeacherClient(blackbox.http_url, api_key=blackbox.api_key) as client:
        response = client.chunk_score(request)
    with GrpcTeacherClient(blackbox.grpc_target, api_key=blackbox.api_key) as client:
        via_grpc = client.chunk_score(request)
    (chunk,) = response.chunks
    assert (chunk.start, chunk.end) == (4, 7) and response.usage.requests == 1
    assert chunk.similarity == 0 and chunk.reward == pytest.approx(0.5)  # no samples: the prior
    prompt = ChatTemplate.load(None).render(QUESTION, "".join(pieces[:4]))
    direct = completion(
        llama.base_url, prompt, max_tokens=6, temperature=0.0, logprobs=20, stop=["<|im_end|>"]
    )["tokens"]
    assert chunk.teacher_tokens is not None and [t.text for t in chunk.teacher_tokens] == [
        t["token"] for t in direct
    ]
    for got, want in zip(chunk.teacher_tokens, direct, strict=True):
        alternatives = {a["token"]: a["logprob"] for a in want["top_logprobs"]}
        assert len(got.top_tokens) == len(alternatives) and got.top_logprobs == sorted(got.top_logprobs)[::-1]
        for text, logprob in zip(got.top_tokens, got.top_logprobs, strict=True):
            assert logprob == pytest.approx(alternatives[text], abs=2e-3)
    assert [t.text for t in via_grpc.chunks[0].teacher_tokens or []] == [t.text for t in chunk.teacher_tokens]


def test_train_continuation_kd_runs_through_the_real_api(blackbox, tmp_path):
    """Two steps with the KD term only (no samples): one API call per chunk, the continuation positions and
    the teacher's mapped top-k mass logged, the student moved."""
    student = make_tiny_model(tmp_path / "tiny", layers=2, seed=1)
    out = tmp_path / "run"
    cmd = [*opd_command(1), "train", "--teacher-url", blackbox.http_url, "--student", str(student),
           "--out", str(out), "--loss", "chunk", "--steps", "2", "--prompts-per-step", "2",
           "--samples-per-prompt", "1", "--max-new-tokens", "8", "--chunk-num", "2", "--chunk-tokens", "3",
           "--chunk-samples", "0", "--chunk-kd-coef", "1", "--chunk-continuation-tokens", "4",
           "--chunk-kl-coef", "0", "--eval-num-prompts", "2", "--eval-max-new-tokens", "6", "--lr", "1e-3"]  # fmt: skip
    env = {**os.environ, "OPD_TEACHER_API_KEY": blackbox.api_key}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    records = read_metrics(out / "metrics.jsonl")
    steps = [x for x in records if not x.get("eval")]
    assert [x["step"] for x in steps] == [1, 2]
    evals = [x for x in records if x.get("eval")]
    assert [x["step"] for x in evals] == [0, 2]
    assert all(x["eval/kd_forward_kl"] > 0 and x["eval/kd_positions"] > 0 for x in evals)
    assert "forward KL on the teacher's continuations" in r.stdout and "chunk reward" not in r.stdout
    for x in steps:
        assert x["api/requests"] == x["chunk/chunks"]  # the greedy call only
        assert 0 < x["kd/sequences"] <= x["chunk/chunks"] and 0 < x["kd/positions"] <= 4 * x["kd/sequences"]
        # SmolLM2 is sure of most of its tokens: its top-20 holds most of the mass, never more than all
        assert 0.5 < x["kd/topk_mass"] <= 1.0 + 1e-6 and x["kd/forward_kl"] > 0
    before = AutoModelForCausalLM.from_pretrained(student).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_chunk_samples_zero_needs_the_kd_term(tmp_path):
    cmd = [*opd_command(1), "train", "--loss", "chunk", "--chunk-samples", "0", "--chunk-kd-coef", "0"]
    cmd += ["--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "chunk_samples 0 leaves loss chunk without a signal" in r.stderr, r.stderr


@pytest.mark.slow
def test_continuation_kd_on_two_ranks_trains_the_same_rollouts_as_one_process(blackbox, tmp_path):
    """The KD sequences ride in the same micro-batches as the rollouts, padded to the largest rank's count
    (FSDP2 needs every rank in every forward): 2 ranks finish and see the step's rollouts and continuations
    of 1 process. Losses are not compared: llama.cpp's logprobs move between calls (test_blackbox.py)."""
    student = make_tiny_model(tmp_path / "tiny", layers=2, seed=1)
    runs = {}
    for procs in (1, 2):
        out = tmp_path / f"procs-{procs}"
        cmd = [*opd_command(procs), "train", "--teacher-url", blackbox.http_url, "--student", str(student),
               "--out", str(out), "--loss", "chunk", "--steps", "2", "--prompts-per-step", "2",
               "--samples-per-prompt", "2", "--max-new-tokens", "8", "--micro-batch-size", "3",
               "--chunk-continuation-tokens", "5", "--eval-num-prompts", "2", "--eval-max-new-tokens", "6"]  # fmt: skip
        env = {**os.environ, "OPD_TEACHER_API_KEY": blackbox.api_key, "OMP_NUM_THREADS": "1"}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        runs[procs] = [x for x in read_metrics(out / "metrics.jsonl") if not x.get("eval")]
    for one, two in zip(runs[1], runs[2], strict=True):
        for key in ("rollouts", "tokens", "chunk/chunks", "kd/sequences"):
            assert two[key] == one[key], (key, one, two)
        assert two["kd/positions"] > 0 and two["loss"] > 0
