"""The exact full-vocabulary signal end to end: the held-out exact KLs measured through the service
(hidden states + the downloaded head) equal an in-process computation with the teacher's own full logits,
and `opd train --loss exact_*` trains under routing to two teachers with different heads."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from test_train import run_train
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import make_tiny_model
from opd_common.embedded import DEFAULT_TEACHER, embedded_teacher_dir
from opd_student.evaluation import evaluate, heldout_rollouts
from opd_student.metrics_log import read_metrics
from opd_student.prompts import load_prompts
from opd_student.rollout_factory import RolloutFactory
from opd_student.rollouts import pack, student_logprobs
from opd_student.teacher_heads import TeacherHeads
from opd_student.teacher_link import TeacherLink


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("student") / "tiny-student", layers=2, seed=1)


def test_heldout_exact_kls_equal_the_in_process_full_vocabulary_kls(teacher, student_dir):
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    prompts = load_prompts("default-heldout")[:6]
    factory = RolloutFactory(tokenizer, DEFAULT_TEACHER, privileged_context=False)
    link = TeacherLink(teacher.http_url, teacher.api_key, 60.0, 2, 30.0)
    try:
        got = evaluate(student, tokenizer, link, prompts, factory, 10, seed=5, batch_size=4,
                       heads=TeacherHeads(link.client, torch.device("cpu")))  # fmt: skip
    finally:
        link.close()

    # The same held-out rollouts (seeded per prompt), scored in process by the teacher's own forward.
    reference = AutoModelForCausalLM.from_pretrained(embedded_teacher_dir(), dtype=torch.float32)
    rev = fwd = tokens = 0.0
    for rollouts in heldout_rollouts(student, tokenizer, factory, prompts, 10, seed=5, batch_size=4):
        batch = pack(rollouts, tokenizer.pad_token_id)
        with torch.no_grad():
            lq = student_logprobs(student, batch).double()
            lp = student_logprobs(reference, batch).double()
        mask = batch.mask_B_T
        rev += ((lq.exp() * (lq - lp)).sum(-1) * mask).sum().item()
        fwd += ((lp.exp() * (lp - lq)).sum(-1) * mask).sum().item()
        tokens += batch.num_tokens
    assert got["eval/tokens"] == tokens
    # fp32 on the wire and in both forwards, which differ in batching (prefix reuse, padding): logprobs
    # agree to ~1e-5, KLs of several nats to ~1e-5 relative; a wrong head, row or direction is off by > 10 %
    assert got["eval/exact_reverse_kl"] == pytest.approx(rev / tokens, rel=1e-4)
    assert got["eval/exact_forward_kl"] == pytest.approx(fwd / tokens, rel=1e-4)
    assert abs(rev - fwd) / max(rev, fwd) > 0.1  # the two directions differ here: the test tells them apart
    assert got["eval/exact_reverse_kl"] > 0.5  # a random student is far from the teacher


@pytest.mark.parametrize("loss", ["exact_reverse_kl", "exact_jsd"])
def test_exact_losses_train_with_two_teachers_and_their_own_heads(teacher, student_dir, tmp_path, loss):
    """Prompts starting with "what" go to the embedded teacher (D = 576), the rest to the tiny one (another D):
    each row is scored against its own teacher's head."""
    run_train(
        teacher.http_url, teacher.api_key, student_dir, tmp_path / "run",
        "--loss", loss, "--steps", "2", "--teacher-rules", f"(?i)^what => {DEFAULT_TEACHER}",
    )  # fmt: skip
    records = read_metrics(tmp_path / "run")
    train = [r for r in records if not r.get("eval")]
    evals = [r for r in records if r.get("eval")]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [0, 2]
    for r in train:
        assert r["loss"] > 0 and r["tokens"] > 0
    for r in evals:
        assert r["eval/exact_reverse_kl"] > 0 and r["eval/exact_forward_kl"] > 0


def test_exact_loss_with_lora_and_token_weights(teacher, student_dir, tmp_path):
    """LoRA adapters, FiRe's rollout filter and confidence weights and TA-OPD's teachable tokens (both
    scored from the top-k the exact request also asks for) on the exact loss."""
    run_train(
        teacher.http_url, teacher.api_key, student_dir, tmp_path / "run", "--loss", "exact_forward_kl",
        "--steps", "2", "--lora", "--fire-opd", "--fire-drop-fraction", "0.25", "--ta-opd", "--ta-fraction", "0.5",
    )  # fmt: skip
    train = [r for r in read_metrics(tmp_path / "run") if not r.get("eval")]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert r["loss"] > 0 and r["select/rollouts_dropped"] == 1  # 4 rollouts a step: one dropped
        # TA-OPD keeps half of what the filter left: at most half of the step's tokens
        assert 0 < r["select/tokens"] <= math.ceil(0.5 * r["tokens"])
        assert r["select/teachability_chosen_mean"] >= r["select/teachability_mean"]
    assert (tmp_path / "run" / "final" / "config.json").exists()


def test_opd_eval_reports_the_exact_kls(teacher, student_dir, tmp_path):
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "opd_cli.main", "eval", "--teacher-url", teacher.http_url,
           "--teacher-model", "tiny", "--student", str(student_dir), "--num-prompts", "3",
           "--max-new-tokens", "6", "--device", "cpu", "--json-out", str(out)]  # fmt: skip
    env = {**os.environ, "OPD_TEACHER_API_KEY": teacher.api_key}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert f"exact reverse KL    {result['eval/exact_reverse_kl']:.4f}" in r.stdout
    assert f"exact forward KL    {result['eval/exact_forward_kl']:.4f}" in r.stdout
    assert result["eval/exact_reverse_kl"] > 0 and result["eval/tokens"] > 0
