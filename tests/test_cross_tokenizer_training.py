"""`opd train --cross-tokenizer` end to end against the real service: a student with SmolLM2's tokenizer and
a teacher with Gemma 3's (both tiny and random). The default refuses such a teacher and names the option;
with it the run distils over aligned spans and evaluates per byte; a same-tokenizer teacher keeps the
token-level path exactly; the aligned teacher logprobs add up to the teacher's logprob of the completion."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer
from xtok_helpers import make_tiny_gemma_tokenizer_model

from helpers import make_tiny_model, post_score, start_teacher
from opd_client.http_client import HttpTeacherClient
from opd_client.token_bytes import vocab_bytes
from opd_student.metrics_log import read_metrics
from opd_student.rollouts import Rollout
from opd_student.text_scores import align_rollout, student_ids_by_text, student_text, text_request

FAST = [
    "--steps", "2", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "8",
    "--top-k", "8", "--eval-num-prompts", "4", "--eval-max-new-tokens", "8", "--lr", "1e-3",
    "--save-every", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("student") / "tiny-student", layers=2, seed=1)


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_dir):
    gemma = make_tiny_gemma_tokenizer_model(tmp_path_factory.mktemp("models") / "tiny-gemma")
    proc = start_teacher(
        tmp_path_factory.mktemp("teacher-xtok"), models=[f"gemma={gemma}", f"tiny={tiny_model_dir}"]
    )
    yield proc
    proc.stop()


def train(service, student: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPD_TEACHER_API_KEY": service.api_key}
    cmd = [sys.executable, "-m", "opd_cli.main", "train", "--teacher-url", service.http_url,
           "--student", str(student), "--out", str(out), *FAST, *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_another_tokenizer_is_refused_by_default_with_the_option_named(service, student_dir, tmp_path):
    r = train(service, student_dir, tmp_path / "run", "--teacher-model", "gemma")
    assert r.returncode != 0
    assert "tokenizer differs" in r.stderr and "--cross-tokenizer" in r.stderr


@pytest.mark.parametrize("terms", [[], ["--xtok-topk-coef", "0.5", "--xtok-uld-coef", "0.5"]])
def test_cross_tokenizer_run_distils_over_spans_and_evaluates_per_byte(service, student_dir, tmp_path, terms):
    r = train(service, student_dir, tmp_path / "run", "--teacher-model", "gemma", "--cross-tokenizer", *terms)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    records = read_metrics(tmp_path / "run")
    steps = [m for m in records if not m.get("eval")]
    evals = [m for m in records if m.get("eval")]
    assert len(steps) == 2 and len(evals) == 2
    for m in steps:
        assert math.isfinite(m["loss"]) and math.isfinite(m["kl/sampled_reverse_per_byte"])
        assert m["xtok/spans"] >= 1 and m["xtok/bytes"] >= 0
        assert ("xtok/uld" in m) == bool(terms) and ("xtok/topk_forward_kl" in m) == bool(terms)
    for e in evals:
        assert math.isfinite(e["eval/reverse_kl_per_byte"]) and e["eval/bytes"] > 0
        assert e["eval/reverse_kl_per_byte"] == pytest.approx(
            e["eval/reverse_kl"] * e["eval/tokens"] / e["eval/bytes"]
        )
    assert (tmp_path / "run" / "final" / "config.json").exists()


def test_a_same_tokenizer_teacher_keeps_the_token_level_path(service, student_dir, tmp_path):
    plain = train(service, student_dir, tmp_path / "plain", "--teacher-model", "tiny")
    flagged = train(service, student_dir, tmp_path / "flag", "--teacher-model", "tiny", "--cross-tokenizer")
    assert plain.returncode == 0 and flagged.returncode == 0, plain.stderr[-2000:] + flagged.stderr[-2000:]
    a, b = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "flag")
    keys = ("loss", "kl/sampled_reverse", "eval/reverse_kl", "eval/topk_forward_kl", "grad_norm")
    assert [{k: m.get(k) for k in keys} for m in a] == [{k: m.get(k) for k in keys} for m in b]
    assert not any(k.startswith("xtok/") for m in b for k in m)
    # the same-tokenizer eval reports the per-byte measure too, from the same sum as its per-token KL
    for e in (m for m in a if m.get("eval")):
        assert e["eval/reverse_kl_per_byte"] == pytest.approx(
            e["eval/reverse_kl"] * e["eval/tokens"] / e["eval/bytes"]
        )


def test_aligned_teacher_logprobs_sum_to_the_teachers_logprob_of_the_completion(service, student_dir):
    student_tok = AutoTokenizer.from_pretrained(student_dir)
    vocab = vocab_bytes(student_tok)
    chat = [{"role": "user", "content": "Say hi."}]
    ids = student_tok(" Hello naïve 😀 world", add_special_tokens=False)["input_ids"] + [
        student_tok.eos_token_id
    ]
    rollout = Rollout([1], ids, teacher="gemma", teacher_chat=chat)
    text = student_text(rollout, vocab, student_tok.eos_token_id)
    assert text.text == " Hello naïve 😀 world" and text.ends
    with HttpTeacherClient(service.http_url, api_key=service.api_key) as client:
        answer = client.score_text(text_request(rollout, text, top_k=8)).sequences[0]
        aligned = align_rollout(text, answer, student_ids_by_text(vocab), student_tok.eos_token_id)
    assert aligned.span_T[-1] == aligned.num_spans - 1  # EOS in the last span, against the end-of-turn
    assert answer.tokens[-1] == "<end_of_turn>"
    # the spans' sums add up to the teacher's logprob of the whole completion, as /v1/score gives it
    tok = AutoTokenizer.from_pretrained(service_model_dir(service, "gemma"))
    prompt_ids = tok(
        tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )["input_ids"]
    whole = post_score(service, {"model": "gemma", "top_k": 1, "sequences": [
        {"token_ids": prompt_ids + answer.token_ids, "prompt_len": len(prompt_ids)}]})["sequences"][0]  # fmt: skip
    total = float(np.sum(whole["token_logprobs"], dtype=np.float64))
    assert math.isclose(float(aligned.teacher_span_logprob_G.sum(dtype=np.float64)), total, abs_tol=1e-3)
    assert math.isclose(aligned.teacher_logprob, total, abs_tol=1e-4)
    # top-k strings that are student tokens map to those ids; the end-of-turn maps to the student's EOS
    assert aligned.top_ids_T_K is not None
    opened = aligned.top_ids_T_K[aligned.opens_T]
    assert (opened >= 0).any()


def service_model_dir(service, name: str) -> Path:
    """The directory a served model was loaded from (its /v1/models source)."""
    with HttpTeacherClient(service.http_url, api_key=service.api_key) as client:
        (info,) = [i for i in client.models() if i.name == name]
    return Path(info.source)


@pytest.mark.parametrize(("flags", "words"), [(["--ta-opd"], "ta_opd"), (["--discount", "0.9"], "discount")])
def test_token_level_options_are_refused_for_a_cross_tokenizer_run(
    service, student_dir, tmp_path, flags, words
):
    r = train(service, student_dir, tmp_path / "run", "--teacher-model", "gemma", "--cross-tokenizer", *flags)
    assert r.returncode != 0 and words in r.stderr, r.stderr[-2000:]
