"""Per-rollout seeded sampling (rollouts.SeededGumbel, sample_completions): it samples from softmax(z / T),
and a rollout's tokens depend on its seed only, not on the rows it shares a batch with."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import make_tiny_model
from opd_student.rollouts import SeededGumbel, row_seed, sample_completions


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_gumbel_argmax_samples_the_softmax(temperature):
    logits_V = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")])
    rows = 4000
    processor = SeededGumbel([row_seed(7, i) for i in range(rows)], temperature, torch.device("cpu"))
    picks = processor(None, logits_V.expand(rows, -1).clone()).argmax(-1)
    freq = torch.bincount(picks, minlength=5).double() / rows
    p = torch.softmax(logits_V.double() / temperature, -1)
    sigma = (p * (1 - p) / rows).sqrt()
    assert freq[4] == 0  # a -inf logit is never drawn
    assert torch.all((freq - p).abs() <= 4 * sigma + 1e-12), (freq, p)


def test_row_seeds_differ_by_every_key():
    seeds = {row_seed(0, 0, step, row) for step in range(20) for row in range(20)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)
    assert row_seed(0, 0, 1, 2) != row_seed(1, 0, 1, 2) != row_seed(0, 1, 1, 2)


def test_a_rollout_depends_on_its_seed_not_its_batch(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "tiny", layers=2))
    with torch.no_grad():  # a flat next-token distribution, so samples differ visibly
        model.lm_head.weight.mul_(0.02)
    prompts = [[1, 520, 33, 9], [1, 77], [1, 4000, 12, 13, 14, 15]]  # different lengths: different padding
    seeds = [row_seed(3, 0, 0, i) for i in range(6)]  # 3 prompts × 2 samples

    def sample(prompt_ids, row_seeds):
        return sample_completions(model, prompt_ids, 2, 12, 1.0, 2, 2, row_seeds=row_seeds)

    together = sample(prompts, seeds)
    apart = [sample([p], seeds[2 * i : 2 * i + 2])[0] for i, p in enumerate(prompts)]
    assert together == apart
    assert together[0][0] != together[0][1]  # two samples of one prompt are different draws
    assert sample(prompts, [s + 1 for s in seeds]) != together
