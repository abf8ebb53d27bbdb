"""CR-OPD's routed term, LGR's lookahead group reward and the student-top-k stop-gradient forms on
hand-made padded batches, against direct computations of value and gradient."""

from __future__ import annotations

import math

import pytest
import torch

from opd_student.methods import lookahead, routed, topk_forms
from opd_student.rollouts import Rollout

# One row of 3 positions over V = 5, the last position padding (garbage ids and NaN logprobs there).
Q = [[0.4, 0.3, 0.1, 0.1, 0.1], [0.05, 0.05, 0.5, 0.2, 0.2], [0.2] * 5]
IDS = [[0, 1, 3], [2, 3, 4], [-1, 99, 7]]  # the student's top-3 (position 0: ids 0, 1, 3)
P_AT_IDS = [[0.1, 0.6, 0.05], [0.3, 0.3, 0.01], [float("nan")] * 3]
MASK = [[1.0, 1.0, 0.0]]


def _log_q():
    return torch.tensor([Q], dtype=torch.float64).log().requires_grad_(True)


def _grad(loss, log_q):
    (grad,) = torch.autograd.grad(loss.sum(), log_q)
    return grad[0]


@pytest.mark.parametrize(
    ("rewards", "threshold", "routed_at"),
    [([-1.0, 0.5, 0.0], 0.0, [0]), ([-1.0, -0.2, 0.0], 0.0, [0, 1]), ([-1.0, 0.5, 0.0], -2.0, [])],
)
def test_routed_term_moves_mass_to_teacher_supported_reachable_ids(rewards, threshold, routed_at):
    log_q = _log_q()
    term = routed.routed_term(
        log_q,
        torch.tensor([IDS]),
        torch.tensor([P_AT_IDS]).log(),
        torch.tensor([rewards]),
        torch.tensor(MASK),
        threshold,
    )
    grad = _grad(term, log_q)
    for t in range(3):
        if t not in routed_at:
            assert float(term[0, t]) == 0 and grad[t].abs().max() == 0
            continue
        p = P_AT_IDS[t]
        pi = [x / sum(p) for x in p]
        value = sum(w * (math.log(w) - math.log(Q[t][i])) for w, i in zip(pi, IDS[t], strict=True))
        assert float(term[0, t]) == pytest.approx(value, rel=1e-5)
        expected = [0.0] * 5  # d/d log q_v of −Σ π̃ log q = −π̃_v on the reachable ids
        for w, i in zip(pi, IDS[t], strict=True):
            expected[i] = -w
        assert grad[t].tolist() == pytest.approx(expected, abs=1e-6)


def test_top_entropy_positions_and_group_rewards():
    assert lookahead.top_entropy_positions(torch.tensor([0.1, 2.0, 0.5, 2.0, 1.0]), 2) == [1, 3]
    assert lookahead.top_entropy_positions(torch.tensor([0.1, 2.0, 0.5]), 5) == [0, 1, 2]
    conf = torch.tensor([0.9, 0.5, 0.1, 0.5])
    mean, std = 0.5, math.sqrt((0.16 + 0 + 0.16 + 0) / 4)
    assert lookahead.group_rewards(conf).tolist() == pytest.approx(
        [(c - mean) / (std + 1e-6) for c in conf.tolist()], rel=1e-5
    )
    assert lookahead.group_rewards(torch.tensor([0.3, 0.3])).tolist() == [0.0, 0.0]


def test_lookahead_rollouts_score_the_step_after_each_candidate():
    plain = Rollout([1, 5], [10, 11, 12], teacher="t")
    privileged = Rollout([1, 6], [20, 21], teacher_prefix_ids=[1, 7, 7])
    points = [
        lookahead.LookaheadPoints([0, 2], [[30, 31], [32, 33]]),
        lookahead.LookaheadPoints([1], [[40, 41]]),
    ]
    out = lookahead.lookahead_rollouts([plain, privileged], points, placeholder=2)
    assert [(r.prompt_ids, r.completion_ids, r.teacher_prefix_ids, r.teacher) for r in out] == [
        ([1, 5, 30], [2], None, "t"),
        ([1, 5, 31], [2], None, "t"),
        ([1, 5, 10, 11, 32], [2], None, "t"),
        ([1, 5, 10, 11, 33], [2], None, "t"),
        ([1, 6, 20, 40], [2], [1, 7, 7, 20, 40], None),
        ([1, 6, 20, 41], [2], [1, 7, 7, 20, 41], None),
    ]


def test_lookahead_term_against_a_direct_computation():
    points = [lookahead.LookaheadPoints([1], [[2, 4, 0]])]
    rewards = [torch.tensor([[1.2, -0.2, -1.0]])]
    ids, r = lookahead.dense_targets(points, rewards, 3, 3)
    assert ids[0, 1].tolist() == [2, 4, 0] and r[0, 0].abs().sum() == 0 and r[0, 2].abs().sum() == 0
    log_q = _log_q()
    term = lookahead.lookahead_term(log_q, ids, r, torch.tensor(MASK))
    value = -(1.2 * math.log(Q[1][2]) - 0.2 * math.log(Q[1][4]) - 1.0 * math.log(Q[1][0]))
    assert term[0].tolist() == pytest.approx([0.0, value, 0.0], rel=1e-5)
    expected = [1.0, 0.0, -1.2, 0.0, 0.2]  # d/d log q_c = −R_c (R = 1.2 at id 2, −0.2 at 4, −1 at 0)
    assert _grad(term, log_q)[1].tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("stop_gradient", [False, True])
def test_truncated_topk_reverse_kl_and_its_stop_gradient_form(stop_gradient):
    log_q = _log_q()
    loss = topk_forms.truncated_topk_reverse_kl(
        log_q, torch.tensor([IDS]), torch.tensor([P_AT_IDS]).log(), torch.tensor(MASK), stop_gradient
    )
    grad = _grad(loss, log_q)
    for t in range(2):
        terms = [(Q[t][i], p) for i, p in zip(IDS[t], P_AT_IDS[t], strict=True)]
        assert float(loss[0, t]) == pytest.approx(
            sum(q * (math.log(q) - math.log(p)) for q, p in terms), rel=1e-5
        )
        expected = [0.0] * 5
        for i, p in zip(IDS[t], P_AT_IDS[t], strict=True):
            q = Q[t][
                i
            ]  # d/d log q_i of q_i (log q_i − log p_i) = q_i (log q_i − log p_i) + q_i; sg drops + q_i
            expected[i] = q * (math.log(q) - math.log(p)) + (0.0 if stop_gradient else q)
        assert grad[t].tolist() == pytest.approx(expected, abs=1e-6)
    assert float(loss[0, 2]) == 0 and grad[2].abs().max() == 0
