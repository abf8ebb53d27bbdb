"""Off-policy correction of the sampled-token loss (methods/off_policy.py) on hand-made padded batches
against direct per-token computations, and the behaviour logprobs recorded at sampling time."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import make_tiny_model
from opd_student.methods import off_policy
from opd_student.rollouts import row_seed, sample_completions

# Two rows, the second padded after 2 tokens (garbage at padding: NaN and -inf must not leak).
LOG_Q = [[-0.5, -2.0, -1.2], [-0.1, -3.0, 0.0]]
LOG_MU = [[-0.7, -1.0, -1.2], [-0.3, -2.2, float("nan")]]
ADV = [[0.8, -1.5, 0.3], [-0.4, 2.0, float("-inf")]]
MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]


def _tensors():
    log_q = torch.tensor(LOG_Q, dtype=torch.float64, requires_grad=True)
    return log_q, torch.tensor(LOG_MU, dtype=torch.float64), torch.tensor(ADV), torch.tensor(MASK)


def _real():
    return [(b, t) for b in range(2) for t in range(3) if MASK[b][t] > 0]


def _direct(per_token):
    """Value and d/d log q of Σ_t ℓ_t, computed one token at a time with float arithmetic."""
    value, grad = 0.0, [[0.0] * 3 for _ in range(2)]
    for b, t in _real():
        v, g = per_token(LOG_Q[b][t], LOG_MU[b][t], ADV[b][t])
        value += v
        grad[b][t] = g
    return value, grad


def _check(loss_B_T, log_q, direct):
    value, grad = direct
    loss_B_T.sum().backward()  # the losses compute in float32: tolerances of float32 arithmetic
    assert float(loss_B_T.detach().sum()) == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert log_q.grad.flatten().tolist() == pytest.approx(sum(grad, []), rel=1e-5, abs=1e-6)
    assert loss_B_T[1, 2] == 0 and torch.isfinite(loss_B_T).all()


@pytest.mark.parametrize("cap", [1.0, 1.5, 100.0])
def test_truncated_importance_sampling(cap):
    def per_token(lq, lmu, a):
        w = min(math.exp(lq - lmu), cap)
        return -w * a * lq, -w * a  # the weight is detached

    log_q, log_mu, adv, mask = _tensors()
    _check(off_policy.truncated_is_loss(log_q, log_mu, adv, mask, cap), log_q, _direct(per_token))


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.9])
def test_ppo_clip(eps):
    def per_token(lq, lmu, a):
        rho = math.exp(lq - lmu)
        unclipped, clipped = rho * a, min(max(rho, 1 - eps), 1 + eps) * a
        if unclipped <= clipped:
            return -unclipped, -rho * a  # d(ρA)/d log q = ρA
        return -clipped, (-rho * a if 1 - eps < rho < 1 + eps else 0.0)

    log_q, log_mu, adv, mask = _tensors()
    _check(off_policy.ppo_clip_loss(log_q, log_mu, adv, mask, eps), log_q, _direct(per_token))


@pytest.mark.parametrize("delta", [0.05, 0.3])
def test_drpo_regulariser(delta):
    def per_token(lq, lmu, a):
        q, mu = math.exp(lq), math.exp(lmu)
        value = -(q / mu) * a + abs(a) * (q - mu) ** 2 / (2 * delta * mu)
        dq = -a / mu + abs(a) * (q - mu) / (delta * mu)  # d/dq, then the chain rule dq/dlog q = q
        return value, dq * q

    log_q, log_mu, adv, mask = _tensors()
    _check(off_policy.drpo_loss(log_q, log_mu, adv, mask, delta), log_q, _direct(per_token))


def test_drpo_gradient_vanishes_on_the_dppo_boundary():
    """At q − μ = δ·sign(A) the gradient w.r.t. q is 0; on-policy (q = μ) it is the policy gradient's."""
    mu, delta = 0.3, 0.1
    for a, q in ((1.7, mu + delta), (-0.6, mu - delta), (2.0, mu)):
        log_q = torch.tensor([[math.log(q)]], dtype=torch.float64, requires_grad=True)
        loss = off_policy.drpo_loss(
            log_q, torch.tensor([[math.log(mu)]]), torch.tensor([[a]]), torch.ones(1, 1), delta
        )
        loss.sum().backward()
        expected = -a if q == mu else 0.0  # on-policy: d(−ρA)/d log q = −A
        assert float(log_q.grad) == pytest.approx(expected, abs=1e-6)


def test_on_policy_tokens_are_unchanged_by_every_correction():
    """With μ = q (ratio 1) every surrogate's gradient is the plain policy gradient −A ∇log q."""
    log_q = torch.tensor([[-0.5, -2.0, -1.2]], dtype=torch.float64, requires_grad=True)
    adv, mask = torch.tensor([[0.8, -1.5, 0.3]]), torch.ones(1, 3)
    for loss in (
        off_policy.truncated_is_loss(log_q, log_q.detach(), adv, mask, 2.0),
        off_policy.ppo_clip_loss(log_q, log_q.detach(), adv, mask, 0.2),
        off_policy.drpo_loss(log_q, log_q.detach(), adv, mask, 0.1),
    ):
        (grad,) = torch.autograd.grad(loss.sum(), log_q)
        assert grad.flatten().tolist() == pytest.approx((-adv).flatten().tolist(), rel=1e-6)


def test_ratio_stats_count_what_each_correction_acted_on():
    log_q, log_mu, adv, mask = _tensors()
    ratios = [math.exp(LOG_Q[b][t] - LOG_MU[b][t]) for b, t in _real()]
    total, log_abs, acted, top = off_policy.ratio_stats(log_q.detach(), log_mu, adv, mask, "truncate", 1.5)
    assert total == pytest.approx(sum(ratios)) and top == pytest.approx(max(ratios))
    assert log_abs == pytest.approx(sum(abs(math.log(r)) for r in ratios))
    assert acted == sum(r > 1.5 for r in ratios)
    _, _, clipped, _ = off_policy.ratio_stats(log_q.detach(), log_mu, adv, mask, "clip", 0.2)
    expect = sum(
        (ADV[b][t] > 0 and r > 1.2) or (ADV[b][t] < 0 and r < 0.8)
        for (b, t), r in zip(_real(), ratios, strict=True)
    )
    assert clipped == expect


def test_behaviour_tensor_pads_and_refuses_rows_without_a_record():
    out = off_policy.behaviour_tensor([[-1.0, -2.0], [-0.5]], 3)
    assert out.tolist() == [[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]]
    with pytest.raises(ValueError, match="behaviour logprobs"):
        off_policy.behaviour_tensor([[-1.0], None], 2)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recorded_behaviour_logprobs_are_the_sampling_distribution(tmp_path, temperature):
    """Recording changes no sampled token, and each recorded value is log softmax(z / T) at the sampled
    token of a direct forward over prompt + completion."""
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "tiny", layers=2)).eval()
    prompts = [[1, 520, 33, 9], [1, 77]]  # different lengths: left padding differs
    seeds = [row_seed(5, 0, 0, i) for i in range(4)]
    plain = sample_completions(model, prompts, 2, 10, temperature, 2, 2, row_seeds=seeds)
    recorded: list[list[float]] = []
    again = sample_completions(
        model, prompts, 2, 10, temperature, 2, 2, row_seeds=seeds, logprobs_out=recorded
    )
    assert again == plain
    rows = [(p, c) for p, group in zip(prompts, plain, strict=True) for c in group]
    assert [len(r) for r in recorded] == [len(c) for _, c in rows]
    for (prompt, completion), logprobs in zip(rows, recorded, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0].float()
        direct = torch.log_softmax(logits / temperature, -1)
        expected = [float(direct[len(prompt) - 1 + t, tok]) for t, tok in enumerate(completion)]
        assert logprobs == pytest.approx(expected, abs=2e-4)
