"""rollout_dtype bfloat16 (issue 25): rollouts come from a bf16 copy of the student's current weights, the
master weights stay fp32, and `opd bench rollouts` runs end to end."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import make_tiny_model
from opd_student.config import TrainConfig
from opd_student.rollouts import row_seed, sample_completions
from opd_student.sampling_copy import SamplingCopy
from opd_student.student_model import Student

PROMPTS = [[1, 504, 2114, 1701], [1, 9690, 314, 253, 1345, 28]]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("rollout-dtype") / "student", layers=2, seed=3)


def test_the_copy_follows_the_source_weights(student_dir):
    lm = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    sampling = SamplingCopy(lm)
    copy = sampling.refreshed()
    assert all(p.dtype == torch.bfloat16 for p in copy.parameters())
    assert all(b.dtype == s.dtype for b, s in zip(copy.buffers(), lm.buffers(), strict=True))
    with torch.no_grad():  # an optimiser step on the source
        lm.model.layers[0].mlp.up_proj.weight.add_(0.5)
    copy = sampling.refreshed()
    assert torch.equal(
        copy.model.layers[0].mlp.up_proj.weight, lm.model.layers[0].mlp.up_proj.weight.to(torch.bfloat16)
    )
    assert lm.model.layers[0].mlp.up_proj.weight.dtype == torch.float32


def test_the_student_samples_with_a_bf16_copy_of_its_current_weights(student_dir, monkeypatch):
    from opd_student import student_model

    cfg = TrainConfig(student=str(student_dir), rollout_dtype="bfloat16", bf16="false")
    student = Student.load(student_dir, cfg, torch.device("cpu"))
    seeds = [row_seed(0, 0, 0, i) for i in range(4)]
    used = []

    def spy(model, *args, **kwargs):
        used.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return sample_completions(model, *args, **kwargs)

    monkeypatch.setattr(student_model, "sample_completions", spy)
    for _ in range(2):
        student.sample(PROMPTS, 2, 12, 1.0, seeds)
        expected = {n: p.to(torch.bfloat16) for n, p in student.lm.named_parameters()}
        assert used[-1].keys() == expected.keys()
        assert all(torch.equal(used[-1][n], expected[n]) for n in expected)
        with torch.no_grad():  # an optimiser step: the next rollouts must see it
            for p in student.lm.parameters():
                p.mul_(1.5)
    assert all(p.dtype == torch.float32 for p in student.lm.parameters())


def test_the_default_samples_with_the_master_weights(student_dir):
    cfg = TrainConfig(student=str(student_dir), bf16="false")
    student = Student.load(student_dir, cfg, torch.device("cpu"))
    seeds = [row_seed(0, 0, 0, i) for i in range(4)]
    assert student.sampling_copy is None
    assert student.sample(PROMPTS, 2, 12, 1.0, seeds) == sample_completions(
        student.lm, PROMPTS, 2, 12, 1.0, 2, 2, seeds
    )


def test_bench_rollouts_runs(student_dir, tmp_path):
    from opd_bench.rollout_speed import RolloutBenchConfig, run

    out = tmp_path / "rollouts.json"
    record = run(
        RolloutBenchConfig(
            student=str(student_dir), num_prompts=2, samples=1, max_new_tokens=6, rounds=1, json_out=str(out)
        )
    )
    assert out.exists()
    assert record["tokens"]["fp32"] > 0 and record["tokens"]["bf16"] > 0
    assert record["kl_fp32_bf16_per_token"] >= 0
    assert 0 <= record["same_tokens_before_first_difference"] <= 1
