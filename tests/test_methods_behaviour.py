"""TRB's trust-region blend, TRD's refinement and the teacher-aligned prompt selection on hand-made cases,
against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opd_student.methods import behaviour_blend as trb
from opd_student.methods import refine
from opd_student.methods.prompt_selection import top_fraction_indices
from opd_student.rollouts import Rollout, row_seed

Q = [[0.5, 0.2, 0.15, 0.1, 0.05], [0.25, 0.25, 0.25, 0.2, 0.05]]


def test_budget_anneals_linearly_to_zero():
    assert [trb.budget(k, 0.4, 4) for k in range(6)] == pytest.approx([0.4, 0.3, 0.2, 0.1, 0.0, 0.0])


def test_teacher_tail_is_spread_in_proportion_to_the_student():
    log_q = torch.tensor(Q).log()
    ids = torch.tensor([[3, 0], [1, 4]])
    top = torch.tensor([[0.6, 0.1], [0.5, 0.3]]).log()
    tail = torch.tensor([0.3, 0.2]).log()
    p = trb.teacher_full_logprobs(log_q, ids, top, tail).exp()
    out0 = 0.2 + 0.15 + 0.05  # the student's mass off row 0's teacher top-2 (ids 1, 2, 4)
    expected0 = [0.1, 0.3 * 0.2 / out0, 0.3 * 0.15 / out0, 0.6, 0.3 * 0.05 / out0]
    assert p[0].tolist() == pytest.approx(expected0, rel=1e-5)
    assert p.sum(-1).tolist() == pytest.approx([1.0, 1.0], rel=1e-5)


def _kl(a, b):
    return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b, strict=True))


def _geometric(q, p, beta):
    w = [qi ** (1 - beta) * pi**beta for qi, pi in zip(q, p, strict=True)]
    return [x / sum(w) for x in w]


@pytest.mark.parametrize("epsilon", [0.0, 0.01, 0.1, 10.0])
def test_largest_beta_is_the_largest_blend_inside_the_trust_region(epsilon):
    q = torch.tensor(Q, dtype=torch.float64)
    p = torch.tensor([[0.05, 0.05, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.1, 0.6]], dtype=torch.float64)
    beta = trb.largest_beta(q.log().float(), p.log().float(), epsilon)
    for b in range(2):
        qb, pb, beta_b = Q[b], p[b].tolist(), float(beta[b])
        mu = trb.blend(q.log().float()[b : b + 1], p.log().float()[b : b + 1], beta[b : b + 1]).exp()[0]
        assert mu.tolist() == pytest.approx(_geometric(qb, pb, beta_b), rel=1e-4)
        if _kl(pb, qb) <= epsilon:  # the teacher itself fits
            assert beta_b == 1.0
            continue
        assert _kl(_geometric(qb, pb, beta_b), qb) <= epsilon + 1e-6
        assert _kl(_geometric(qb, pb, min(1.0, beta_b + 1e-3)), qb) > epsilon  # no larger β fits
    if (
        epsilon == 0.0
    ):  # float32 rounding leaves KL ≈ 0 for β within ~1e-4 of 0 (the sampler never asks ε = 0)
        assert beta.max() < 1e-3


def test_blended_sampler_records_log_mu_and_leaves_ended_rows_to_the_student():
    V = 5
    calls = []

    def teacher_next(generated, rows):
        calls.append((generated, rows))
        L = len(rows)
        return torch.tensor([[3, 4]] * L), torch.tensor([[0.7, 0.2]] * L).log(), torch.tensor([0.1] * L).log()

    seeds = [row_seed(1, i) for i in range(2)]
    sampler = trb.BlendedGumbel(
        seeds, 1.0, torch.device("cpu"), 0.05, teacher_next, [[1], [1]], eos_token_id=2
    )
    sampler.prompt_width = 1
    logits = torch.tensor(Q).log()
    out = sampler(torch.tensor([[1], [1]]), logits.clone())
    assert calls[0] == ([[], []], [0, 1])
    chosen = out.argmax(-1)
    log_q = torch.log_softmax(logits, -1)
    log_p = trb.teacher_full_logprobs(
        log_q,
        torch.tensor([[3, 4]] * 2),
        torch.tensor([[0.7, 0.2]] * 2).log(),
        torch.tensor([0.1, 0.1]).log(),
    )
    log_mu = trb.blend(log_q, log_p, trb.largest_beta(log_q, log_p, 0.05))
    assert sampler.logprobs_S_B[0].tolist() == pytest.approx(
        log_mu.gather(-1, chosen[:, None])[:, 0].tolist(), rel=1e-5
    )
    out2 = sampler(torch.tensor([[1, 2], [1, 3]]), logits.clone())  # row 0 has ended (EOS = 2)
    assert calls[1] == ([[3]], [1])
    assert float(sampler.logprobs_S_B[1][0]) == pytest.approx(float(log_q[0, out2[0].argmax()]), rel=1e-5)
    assert sampler.teacher_positions == 3 and out.shape[-1] == V


def test_trd_cuts_at_the_first_failing_token_and_keeps_the_prefix():
    assert refine.first_failure(np.array([-0.5, -5.0, -0.1, -6.0]), -4.0) == 1
    assert refine.first_failure(np.array([-0.5, -1.0]), -4.0) is None
    r = Rollout(
        [1, 9], [10, 11, 12, 13], teacher_prefix_ids=[1, 8, 8], behaviour_logprobs=[-1.0, -2.0, -3.0, -4.0]
    )
    assert refine.teacher_view(r, 2) == [1, 8, 8, 10, 11]
    assert refine.teacher_view(Rollout([1, 9], [10, 11]), 1) == [1, 9, 10]
    out = refine.refined(r, 2, [50, 51, 2])
    assert out.completion_ids == [10, 11, 50, 51, 2] and out.teacher_from == 2
    assert out.behaviour_logprobs == [-1.0, -2.0, 0.0, 0.0, 0.0] and out.prompt_ids == [1, 9]
    assert refine.refined(r, 2, []) is r


def test_prompt_selection_keeps_the_top_fraction_in_order():
    scores = [-1.0, -0.2, -3.0, -0.2, -0.5]
    assert top_fraction_indices(scores, 0.4) == [1, 3]
    assert top_fraction_indices(scores, 0.5) == [1, 3, 4]  # ⌈2.5⌉ = 3
    assert top_fraction_indices(scores, 0.01) == [1]  # at least one; ties: the earlier
    assert top_fraction_indices(scores, 1.0) == [0, 1, 2, 3, 4]
