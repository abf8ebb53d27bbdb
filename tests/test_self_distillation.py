"""On-policy self-distillation (the teacher is the student with privileged context) and EDGE-OPD's evidence
mask (methods/evidence.py, our reading of the paper).

- the evidence of a token is log p(x | teacher_messages) − log p(x | prompt): checked against an in-process
  forward of the teacher's weights, through the real service (TOL = 1e-4 as in test_live_weights.py);
- the mask keeps exactly the tokens above the threshold, a rollout without privileged context keeps all,
  and the step's loss is the mean over the kept tokens (hand-made numbers);
- `opd train --self-distillation` runs 2 steps end to end: the local teacher serves the student, follows it
  with --teacher-follows-student, and the evidence mask reports what it kept.
"""

from __future__ import annotations

import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import make_tiny_model, start_teacher
from opd_client.scores import SequenceScores
from opd_student.config import TrainConfig
from opd_student.methods.evidence import evidence, evidence_per_rollout, request_plain_scores
from opd_student.methods.step_weights import StepWeights
from opd_student.methods.token_mask import TokenMaskRule
from opd_student.metrics_log import read_metrics
from opd_student.rollouts import Rollout
from opd_student.teacher_link import TeacherLink

TOL = 1e-4


def scores(token_logprobs: list[float]) -> SequenceScores:
    lp = np.array(token_logprobs, dtype=np.float32)
    return SequenceScores(
        lp, np.zeros((len(lp), 1), np.int32), lp[:, None], np.full(len(lp), -5.0, np.float32)
    )


# ---- the mask on hand-made numbers ----------------------------------------------------------------------


def test_evidence_is_the_logprob_the_privileged_context_adds():
    e = evidence(scores([-1.0, -3.0, -0.5]), scores([-2.0, -2.5, -0.5]))
    assert e.tolist() == [1.0, -0.5, 0.0]


def test_the_mask_keeps_tokens_above_the_threshold_and_unprivileged_rollouts_whole():
    cfg = SimpleNamespace(
        evidence_mask=True, evidence_threshold=0.25, fire_opd=False, ta_opd=False, fire_reweight=False
    )
    rollouts = [Rollout([1], [5, 6, 7, 8], teacher_prefix_ids=[1, 2]), Rollout([1], [5, 6])]
    evidence_N_T = [torch.tensor([1.0, 0.25, -2.0, 0.3]), None]
    weights = StepWeights(cfg, rollouts, [], None, TokenMaskRule(), evidence_N_T=evidence_N_T)
    w_B_T = weights.micro_batch([0, 1], torch.zeros(2, 4, 3), None, torch.ones(2, 4))
    assert w_B_T.tolist() == [[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]]
    metrics = weights.metrics()
    assert metrics["select/tokens"] == 4 and metrics["select/token_fraction"] == 4 / 6
    assert metrics["select/evidence_mean"] == pytest.approx((1.0 + 0.25 - 2.0 + 0.3) / 4)
    assert metrics["select/evidence_kept"] == 2 / 4
    assert weights.loss_denominator() == 4.0  # the step's loss: the mean over the kept tokens


# ---- the evidence through the real service -----------------------------------------------------------------


def test_the_evidence_request_scores_without_the_privileged_context(tmp_path_factory, tiny_model_dir):
    teacher = start_teacher(tmp_path_factory.mktemp("evidence"), [f"tiny={tiny_model_dir}"])
    link = TeacherLink(teacher.http_url, teacher.api_key, 60, 2, 60)
    try:
        rollouts = [
            Rollout([1, 504, 3575], [282, 905, 17, 42], teacher_prefix_ids=[1, 9690, 198, 2830, 4]),
            Rollout([1, 504], [3575, 282]),  # no privileged context: not sent again
            Rollout([1, 7, 8, 9], [10, 11, 12], teacher_prefix_ids=[1, 7]),
        ]
        request = request_plain_scores(link, rollouts)
        assert request is not None and request.idx == [0, 2]
        privileged = link.collect(link.submit(rollouts, top_k=4))
        evidence_N_T = evidence_per_rollout(request, link.collect(request.pending), privileged)
        assert evidence_N_T[1] is None
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        for i in (0, 2):
            r = rollouts[i]
            want = logprobs(model, r.teacher_prefix_ids, r.completion_ids) - logprobs(
                model, r.prompt_ids, r.completion_ids
            )
            assert float((evidence_N_T[i] - want).abs().max()) <= TOL
    finally:
        link.close()
        teacher.stop()


@torch.inference_mode()
def logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    logprobs_L_V = torch.log_softmax(model(ids).logits[0].float(), -1)
    rows = logprobs_L_V[len(prompt) - 1 : -1]
    return rows.gather(-1, torch.tensor(completion)[:, None])[:, 0]


# ---- the recipe's run, 2 steps -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("self-student") / "student", layers=2, seed=1)


@pytest.fixture
def train_run(student, tmp_path):
    def go(**settings):
        from opd_student.train import train

        base = dict(
            student=str(student),
            out=str(tmp_path / "run"),
            prompts="default-privileged",
            eval_prompts="default-privileged-heldout",
            prompts_per_step=2,
            samples_per_prompt=2,
            max_new_tokens=8,
            top_k=8,
            eval_num_prompts=2,
            eval_max_new_tokens=4,
            lr=1e-3,
            steps=2,
            save_every=0,
        )
        cfg = TrainConfig(**{**base, **settings})
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            train(cfg)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        return [r for r in read_metrics(cfg.out) if not r.get("eval")]

    return go


def test_self_distillation_two_steps_with_the_current_weights_and_the_evidence_mask(train_run, tmp_path):
    records = train_run(
        self_distillation=True, teacher_follows_student=1, evidence_mask=True, max_staleness=0
    )
    assert [r["teacher/pushed_version"] for r in records] == [1, 2]
    assert [r["teacher/weights_version_max"] for r in records] == [0, 1]  # step 2 scored by step 1's weights
    for r in records:
        assert r["gen/privileged"] == 1.0  # every default-privileged prompt has teacher_messages
        assert 0.0 <= r["select/evidence_kept"] <= 1.0 and np.isfinite(r["select/evidence_mean"])
        assert r["select/tokens"] == round(r["select/evidence_kept"] * r["tokens"])
    logs = list((tmp_path / "run").glob("teacher-*.log"))
    assert len(logs) == 1 and "loading student from" in logs[0].read_text()


def test_self_distillation_with_the_initial_weights_and_a_fixed_eval_teacher(
    train_run, student, tmp_path_factory, monkeypatch
):
    """No following: the teacher stays the student's starting weights (the frozen-teacher variant). With
    eval_teacher_url the held-out KL is measured against that service (its scored-token counter moves)."""
    fixed = start_teacher(tmp_path_factory.mktemp("eval-teacher"), [f"initial={student}"])
    monkeypatch.setenv("OPD_EVAL_TEACHER_API_KEY", fixed.api_key)
    try:
        before = scored_tokens(fixed)
        records = train_run(self_distillation=True, eval_teacher_url=fixed.http_url)
        assert scored_tokens(fixed) > before
    finally:
        fixed.stop()
    assert not any("teacher/pushed_version" in r for r in records)
    assert all(r["gen/privileged"] == 1.0 for r in records)


def scored_tokens(teacher) -> float:
    import httpx

    text = httpx.get(f"{teacher.http_url}/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("opd_scored_tokens_total{")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)
