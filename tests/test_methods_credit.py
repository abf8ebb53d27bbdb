"""Temporal credit of the sampled-token reward (methods/credit.py): GAE-OPD, vOPD's top-k value and TOPD's
near-future guidance on hand-made padded batches, against direct per-token loops."""

from __future__ import annotations

import math

import pytest
import torch

from opd_student import losses
from opd_student.methods import credit

REWARDS = [[-0.5, 0.2, -1.5, 0.4], [-2.0, -0.1, 7.0, 9.0]]
VALUES = [[-0.3, -0.6, -0.2, -0.9], [-1.0, -0.4, 5.0, 5.0]]
MASK = [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]]  # row 1 padded after 2 tokens (garbage there)


def _rows():
    for b in range(2):
        n = int(sum(MASK[b]))
        yield b, REWARDS[b][:n], VALUES[b][:n]


def _gae_direct(gamma, lam):
    out = [[0.0] * 4 for _ in range(2)]
    for b, r, v in _rows():
        for t in range(len(r)):
            total = 0.0
            for k in range(t, len(r)):
                next_v = v[k + 1] if k + 1 < len(r) else 0.0
                total += (gamma * lam) ** (k - t) * (r[k] + gamma * next_v - v[k])
            out[b][t] = total
    return out


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.0), (0.8, 1.0), (0.0, 0.5)])
def test_gae_against_the_definition(gamma, lam):
    got = credit.gae_advantages(torch.tensor(REWARDS), torch.tensor(VALUES), torch.tensor(MASK), gamma, lam)
    assert got.flatten().tolist() == pytest.approx(sum(_gae_direct(gamma, lam), []), abs=1e-5)


def test_gae_with_lambda_one_is_the_return_to_go_minus_the_value():
    r, v, m = torch.tensor(REWARDS), torch.tensor(VALUES), torch.tensor(MASK)
    got = credit.gae_advantages(r, v, m, 0.9, 1.0)
    return_to_go = losses.reverse_kl_advantages(-r, torch.zeros_like(r), m, discount=0.9)  # r = 0 − (−r)
    assert got.flatten().tolist() == pytest.approx((return_to_go - v * m).flatten().tolist(), abs=1e-5)


def test_gae_with_gamma_zero_is_the_reward_minus_the_value():
    r, v, m = torch.tensor(REWARDS), torch.tensor(VALUES), torch.tensor(MASK)
    got = credit.gae_advantages(r, v, m, 0.0, 0.7)
    assert got.flatten().tolist() == pytest.approx(((r - v) * m).flatten().tolist(), abs=1e-6)


def test_topk_reverse_kl_value_on_buckets():
    # V = 5, teacher top-2 at each of 2 positions (the second is padding, with garbage ids)
    q = torch.tensor([[[0.5, 0.2, 0.1, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]]])
    ids = torch.tensor([[[1, 0], [99, -1]]])
    p_top = torch.tensor([[[0.6, 0.3], [0.5, 0.5]]])
    tail = torch.log(torch.tensor([[0.1, 0.0]]))
    mask = torch.tensor([[1.0, 0.0]])
    got = credit.topk_reverse_kl(q.log(), ids, p_top.log(), tail, mask)
    q_buckets, p_buckets = [0.2, 0.5, 0.3], [0.6, 0.3, 0.1]
    direct = sum(a * (math.log(a) - math.log(b)) for a, b in zip(q_buckets, p_buckets, strict=True))
    assert got[0].tolist() == pytest.approx([direct, 0.0], abs=1e-6)
    value = credit.topk_value(q.log(), ids, p_top.log(), tail, mask)
    assert value[0].tolist() == pytest.approx([-direct, 0.0], abs=1e-6)


def _window_direct(x, window):
    out = [[0.0] * 4 for _ in range(2)]
    for b in range(2):
        n = int(sum(MASK[b]))
        for t in range(n):
            part = x[b][t : min(n, t + window)]
            out[b][t] = sum(part) / len(part)
    return out


@pytest.mark.parametrize("window", [1, 2, 3, 10])
def test_near_future_advantage_is_the_window_mean(window):
    got = credit.near_future_advantages(torch.tensor(REWARDS), torch.tensor(MASK), window)
    assert got.flatten().tolist() == pytest.approx(sum(_window_direct(REWARDS, window), []), abs=1e-6)


def test_near_future_keep_drops_high_loss_tokens_of_non_divergent_states():
    divergence = [[0.1, 0.2, 3.0, 0.1], [2.5, 0.0, 9.0, 9.0]]
    window, tau = 2, 1.0
    got = credit.near_future_keep(
        torch.tensor(REWARDS), torch.tensor(divergence), torch.tensor(MASK), window, tau
    )
    means = _window_direct(divergence, window)
    expected = [
        [float(MASK[b][t] > 0 and not (-REWARDS[b][t] > tau and means[b][t] <= tau)) for t in range(4)]
        for b in range(2)
    ]
    assert got.tolist() == expected
    # row 0: token 2 has high loss (1.5) and a divergent window (3.0, 0.1 → 1.55): kept;
    # row 1: token 0 has high loss (2.0), its window (2.5, 0.0) → 1.25 is divergent: kept
    assert expected == [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]]
    calm = [[0.1, 0.2, 0.5, 3.0], [2.5, 0.0, 9.0, 9.0]]  # token 2 of row 0: loss 1.5, window (0.5) calm
    dropped = credit.near_future_keep(torch.tensor(REWARDS), torch.tensor(calm), torch.tensor(MASK), 1, tau)
    assert dropped.tolist() == [[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]]
