"""OPD losses against direct hand computations (python floats, loops over positions) on tiny tensors."""

from __future__ import annotations

import math
import random

import pytest
import torch

from opd_student import losses
from opd_student.losses import (
    TAIL_LOGPROB_FLOOR,
    generalized_jsd,
    gkd_mix,
    policy_gradient_loss,
    reverse_kl_advantages,
    sampled_reverse_kl,
    student_topk_reverse_kl,
    token_mean,
    topk_forward_kl,
)

B, T, V, K = 2, 3, 7, 3
# Second sequence is one token shorter: its last position is padding.
MASK_B_T = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def _logprobs(seed: int, shape=(B, T, V), dtype=torch.float32, scale: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, generator=gen, dtype=torch.float64) * scale, -1).to(dtype)


def _teacher_topk(teacher_B_T_V: torch.Tensor, k: int):
    """What the service sends: top-k ids/logprobs and the log of the remaining mass, floored."""
    top_lp, top_ids = teacher_B_T_V.topk(k, dim=-1)
    rest = teacher_B_T_V.scatter(-1, top_ids, float("-inf"))
    tail = rest.logsumexp(-1).clamp_min(TAIL_LOGPROB_FLOOR)
    return top_ids.to(torch.int32), top_lp, tail


def _real_positions(mask_B_T=MASK_B_T):
    return [(b, t) for b in range(mask_B_T.shape[0]) for t in range(mask_B_T.shape[1]) if mask_B_T[b, t] > 0]


def _kl(a: list[float], b: list[float]) -> float:
    """KL(a‖b) of two probability vectors, in plain python."""
    return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b, strict=True) if x > 0)


def _hand_buckets(student_B_T_V, ids_B_T_K, b, t):
    """Student bucket probabilities at ids (b, t) plus 1 − Σ, in python floats."""
    q = [math.exp(student_B_T_V[b, t, int(i)].item()) for i in ids_B_T_K[b, t]]
    return [*q, 1.0 - sum(q)]


def _assert_padding_zero(per_token_B_T, mask_B_T=MASK_B_T):
    assert torch.isfinite(per_token_B_T).all()
    assert (per_token_B_T[mask_B_T == 0] == 0).all()


# --- sampled reverse KL / policy gradient -----------------------------------------------------------------


def test_sampled_reverse_kl_and_advantages_without_discount():
    student = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, float("nan")]])
    teacher = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -0.2, float("-inf")]])
    kl = sampled_reverse_kl(student, teacher, MASK_B_T)
    adv = reverse_kl_advantages(student, teacher, MASK_B_T)
    for b, t in _real_positions():
        assert kl[b, t].item() == pytest.approx(student[b, t].item() - teacher[b, t].item())
        assert adv[b, t].item() == pytest.approx(teacher[b, t].item() - student[b, t].item())
    _assert_padding_zero(kl)
    _assert_padding_zero(adv)


def test_advantages_are_discounted_return_to_go_over_real_tokens():
    gamma = 0.5
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])  # a hole, and right padding
    student = torch.tensor([[-1.0, -9.0, -0.5, -2.0], [-0.1, -3.0, -1.0, 0.0]])
    teacher = torch.tensor([[-0.5, float("nan"), -1.5, -1.0], [-2.0, -0.2, -1.0, float("-inf")]])
    adv = reverse_kl_advantages(student, teacher, mask, discount=gamma)
    for b in range(2):
        real = [t for t in range(4) if mask[b, t] > 0]
        rewards = {t: teacher[b, t].item() - student[b, t].item() for t in real}
        for i, t in enumerate(real):
            expected = sum(gamma**j * rewards[s] for j, s in enumerate(real[i:]))
            assert adv[b, t].item() == pytest.approx(expected, rel=1e-6)
    _assert_padding_zero(adv, mask)
    # Row 0 by hand: r = [0.5, ·, -1.0, 1.0] → A_3 = 1, A_2 = -1 + 0.5, A_0 = 0.5 + 0.5 · (-0.5)
    assert adv[0].tolist() == pytest.approx([0.25, 0.0, -0.5, 1.0])
    # γ = 1: plain suffix sums. Row 1: r = [-1.9, 2.8, 0.0, ·].
    undiscounted = reverse_kl_advantages(student, teacher, mask, discount=1.0)
    assert undiscounted[1].tolist() == pytest.approx([0.9, 2.8, 0.0, 0.0], rel=1e-6)


def test_advantages_carry_no_gradient_and_reject_bad_discount():
    student = torch.randn(B, T, requires_grad=True)
    adv = reverse_kl_advantages(student, torch.randn(B, T), MASK_B_T, discount=0.9)
    assert not adv.requires_grad
    assert not sampled_reverse_kl(student, torch.randn(B, T), MASK_B_T).requires_grad
    with pytest.raises(ValueError, match="discount"):
        reverse_kl_advantages(student, student, MASK_B_T, discount=1.5)


def test_policy_gradient_loss_value_and_gradient():
    student = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, float("-inf")]], requires_grad=True)
    adv = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, float("nan")]], requires_grad=True)
    loss = policy_gradient_loss(student, adv, MASK_B_T)
    for b, t in _real_positions():
        assert loss[b, t].item() == pytest.approx(-adv[b, t].item() * student[b, t].item())
    _assert_padding_zero(loss)
    loss.sum().backward()
    expected_grad = torch.where(MASK_B_T > 0, -adv.detach(), 0.0)
    torch.testing.assert_close(student.grad, expected_grad)
    assert adv.grad is None  # advantages are detached


# --- top-k forward KL ---------------------------------------------------------------------------------------


def test_topk_forward_kl_matches_hand_computation():
    student, teacher = _logprobs(0), _logprobs(1)
    ids, top_lp, tail = _teacher_topk(teacher, K)
    loss = topk_forward_kl(student, ids, top_lp, tail, MASK_B_T)
    for b, t in _real_positions():
        p = [math.exp(x) for x in top_lp[b, t].tolist()] + [math.exp(tail[b, t].item())]
        q = _hand_buckets(student, ids, b, t)
        assert loss[b, t].item() == pytest.approx(_kl(p, q), rel=1e-5, abs=1e-6)
    _assert_padding_zero(loss)


@pytest.mark.parametrize("tail_value", [TAIL_LOGPROB_FLOOR, float("-inf")])
def test_topk_forward_kl_with_full_vocab_is_the_full_kl(tail_value):
    student, teacher = _logprobs(2), _logprobs(3)
    ids, top_lp, _ = _teacher_topk(teacher, V)
    tail = torch.full((B, T), tail_value)  # floored by the service, or not: both must vanish cleanly
    loss = topk_forward_kl(student, ids, top_lp, tail, MASK_B_T)
    full = (teacher.exp() * (teacher - student)).sum(-1) * MASK_B_T
    torch.testing.assert_close(loss, full, atol=1e-6, rtol=0)


# --- reverse KL on the student's top-k ----------------------------------------------------------------------


def test_student_topk_reverse_kl_matches_hand_computation():
    student, teacher = _logprobs(4), _logprobs(5)
    _, student_ids = student.topk(K, dim=-1)
    score_lp = teacher.gather(-1, student_ids)  # the service's score_ids answer
    loss = student_topk_reverse_kl(student, student_ids, score_lp, MASK_B_T)
    for b, t in _real_positions():
        q = _hand_buckets(student, student_ids, b, t)
        p = [math.exp(x) for x in score_lp[b, t].tolist()]
        p = [*p, 1.0 - sum(p)]
        assert loss[b, t].item() == pytest.approx(_kl(q, p), rel=1e-5, abs=1e-6)
    _assert_padding_zero(loss)


def test_student_topk_reverse_kl_with_full_vocab_is_the_full_kl():
    student, teacher = _logprobs(6), _logprobs(7)
    _, student_ids = student.topk(V, dim=-1)
    loss = student_topk_reverse_kl(student, student_ids, teacher.gather(-1, student_ids), MASK_B_T)
    full = (student.exp() * (student - teacher)).sum(-1) * MASK_B_T
    torch.testing.assert_close(loss, full, atol=1e-6, rtol=0)


# --- generalised JSD ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_matches_hand_computation(beta):
    student, teacher = _logprobs(8), _logprobs(9)
    ids, top_lp, tail = _teacher_topk(teacher, K)
    loss = generalized_jsd(student, ids, top_lp, tail, MASK_B_T, beta=beta)
    for b, t in _real_positions():
        p = [math.exp(x) for x in top_lp[b, t].tolist()] + [math.exp(tail[b, t].item())]
        q = _hand_buckets(student, ids, b, t)
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q, strict=True)]
        expected = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
        assert loss[b, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    _assert_padding_zero(loss)


def test_generalized_jsd_endpoints_are_forward_and_reverse_kl_on_buckets():
    student, teacher = _logprobs(10, dtype=torch.float64), _logprobs(11, dtype=torch.float64)
    ids, top_lp, tail = _teacher_topk(teacher, K)
    args = (student, ids, top_lp, tail, MASK_B_T)
    forward = generalized_jsd(*args, beta=0.0)
    reverse = generalized_jsd(*args, beta=1.0)
    torch.testing.assert_close(forward, topk_forward_kl(*args))
    for b, t in _real_positions():
        p = [math.exp(x) for x in top_lp[b, t].tolist()] + [math.exp(tail[b, t].item())]
        q = _hand_buckets(student, ids, b, t)
        assert reverse[b, t].item() == pytest.approx(_kl(q, p), rel=1e-9)
    # Near the ends JSD_β ≈ β KL(p‖q) and ≈ (1 − β) KL(q‖p): the endpoints are the normalised limits.
    eps = 1e-5
    torch.testing.assert_close(generalized_jsd(*args, beta=eps) / eps, forward, rtol=1e-3, atol=1e-9)
    torch.testing.assert_close(generalized_jsd(*args, beta=1 - eps) / eps, reverse, rtol=1e-3, atol=1e-9)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(*args, beta=-0.1)


def test_generalized_jsd_is_symmetric_at_one_half():
    # With K = V the buckets are the whole distributions, so swapping teacher and student is possible.
    a, c = _logprobs(12), _logprobs(13)
    a_ids, a_top, a_tail = _teacher_topk(a, V)
    c_ids, c_top, c_tail = _teacher_topk(c, V)
    jsd_ac = generalized_jsd(c, a_ids, a_top, a_tail, MASK_B_T, beta=0.5)
    jsd_ca = generalized_jsd(a, c_ids, c_top, c_tail, MASK_B_T, beta=0.5)
    torch.testing.assert_close(jsd_ac, jsd_ca, atol=1e-6, rtol=0)
    m = (a.exp() + c.exp()) / 2
    full = 0.5 * (a.exp() * (a - m.log())).sum(-1) + 0.5 * (c.exp() * (c - m.log())).sum(-1)
    torch.testing.assert_close(jsd_ac, full * MASK_B_T, atol=1e-6, rtol=0)
    assert (jsd_ac <= math.log(2) + 1e-6).all()


# --- padding garbage, gradients -----------------------------------------------------------------------------


def _garbage_inputs(dtype=torch.float32):
    """Inputs whose padded position holds the worst a caller might send: nan, -inf, id -1 and id ≥ V."""
    pad = MASK_B_T == 0
    logits = torch.randn(
        B, T, V, dtype=dtype, generator=torch.Generator().manual_seed(14), requires_grad=True
    )
    student = torch.where(pad[..., None], float("nan"), torch.log_softmax(logits, -1))
    ids, top_lp, tail = _teacher_topk(_logprobs(15, dtype=dtype), K)
    ids = ids.masked_fill(pad[..., None], -1)
    ids[1, 2, 0] = V + 100
    top_lp = top_lp.masked_fill(pad[..., None], float("-inf"))
    top_lp[1, 2, 1] = float("nan")
    tail = tail.masked_fill(pad, float("nan"))
    # A real position where the teacher gives a token zero probability (e.g. a masked-out vocab entry).
    top_lp[0, 1, 2] = float("-inf")
    return logits, student, ids, top_lp, tail


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda s, ids, lp, tail: topk_forward_kl(s, ids, lp, tail, MASK_B_T),
        lambda s, ids, lp, tail: student_topk_reverse_kl(s, ids, lp, MASK_B_T),
        lambda s, ids, lp, tail: generalized_jsd(s, ids, lp, tail, MASK_B_T, beta=0.0),
        lambda s, ids, lp, tail: generalized_jsd(s, ids, lp, tail, MASK_B_T, beta=0.5),
        lambda s, ids, lp, tail: generalized_jsd(s, ids, lp, tail, MASK_B_T, beta=1.0),
    ],
    ids=["forward_kl", "student_reverse_kl", "jsd0", "jsd0.5", "jsd1"],
)
def test_topk_losses_survive_garbage_in_padding(loss_fn):
    _, student, ids, top_lp, tail = _garbage_inputs()
    student = student.detach().requires_grad_()  # a leaf with nan at padding: its gradient must be 0 there
    loss = loss_fn(student, ids, top_lp, tail)
    _assert_padding_zero(loss)
    loss.sum().backward()
    assert torch.isfinite(student.grad).all()
    assert (student.grad[1, 2] == 0).all()
    assert student.grad[0].abs().sum() > 0


def test_sampled_losses_survive_garbage_in_padding():
    student = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, float("nan")]], requires_grad=True)
    teacher = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -0.2, float("-inf")]])
    adv = reverse_kl_advantages(student, teacher, MASK_B_T, discount=0.9)
    loss = policy_gradient_loss(student, adv, MASK_B_T)
    _assert_padding_zero(adv)
    _assert_padding_zero(loss)
    loss.sum().backward()
    assert torch.isfinite(student.grad).all() and student.grad[1, 2] == 0


def test_bool_mask_gives_the_same_losses():
    student, teacher = _logprobs(24), _logprobs(25)
    ids, top_lp, tail = _teacher_topk(teacher, K)
    for fn in (topk_forward_kl, generalized_jsd):
        torch.testing.assert_close(
            fn(student, ids, top_lp, tail, MASK_B_T > 0), fn(student, ids, top_lp, tail, MASK_B_T)
        )


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda s, ids, lp, tail: topk_forward_kl(s, ids, lp, tail, MASK_B_T),
        lambda s, ids, lp, tail: student_topk_reverse_kl(s, ids, lp, MASK_B_T),
        lambda s, ids, lp, tail: generalized_jsd(s, ids, lp, tail, MASK_B_T, beta=0.0),
        lambda s, ids, lp, tail: generalized_jsd(s, ids, lp, tail, MASK_B_T, beta=0.3),
        lambda s, ids, lp, tail: generalized_jsd(s, ids, lp, tail, MASK_B_T, beta=1.0),
    ],
    ids=["forward_kl", "student_reverse_kl", "jsd0", "jsd0.3", "jsd1"],
)
def test_topk_loss_gradients_gradcheck(loss_fn):
    logits, _, ids, top_lp, tail = _garbage_inputs(dtype=torch.float64)
    pad = MASK_B_T == 0

    def through_logits(logits_B_T_V):
        student = torch.where(pad[..., None], float("nan"), torch.log_softmax(logits_B_T_V, -1))
        return loss_fn(student, ids, top_lp, tail)

    assert torch.autograd.gradcheck(through_logits, (logits.detach().requires_grad_(),))


def test_topk_forward_kl_gradient_is_q_minus_p_with_full_vocab():
    # d KL(p‖softmax(z)) / dz = q − p: a closed form to compare autograd against.
    teacher = _logprobs(16, dtype=torch.float64)
    logits = torch.randn(B, T, V, dtype=torch.float64, generator=torch.Generator().manual_seed(17))
    logits.requires_grad_()
    ids, top_lp, tail = _teacher_topk(teacher, V)
    topk_forward_kl(torch.log_softmax(logits, -1), ids, top_lp, tail, MASK_B_T).sum().backward()
    expected = (torch.softmax(logits.detach(), -1) - teacher.exp()) * MASK_B_T[..., None]
    torch.testing.assert_close(logits.grad, expected, atol=1e-12, rtol=1e-9)


def test_bf16_student_is_computed_in_fp32():
    student, teacher = _logprobs(18), _logprobs(19)
    ids, top_lp, tail = _teacher_topk(teacher, K)
    loss16 = topk_forward_kl(student.bfloat16(), ids, top_lp, tail, MASK_B_T)
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(
        loss16, topk_forward_kl(student, ids, top_lp, tail, MASK_B_T), atol=0.05, rtol=0.05
    )


# --- normalisation and mixing -------------------------------------------------------------------------------


def test_token_mean_under_gradient_accumulation_equals_one_big_batch():
    gen = torch.Generator().manual_seed(20)
    weights = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    mask_big = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float64
    )
    per_token_big = (weights * 3.0 - 1.0) * mask_big
    total = int(mask_big.sum())  # 12 tokens: 9 in the first micro-batch, 3 in the second
    hand = sum(per_token_big[b, t].item() for b in range(4) for t in range(5) if mask_big[b, t]) / total

    def grads(per_token_fn, splits):
        theta = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        loss = sum(per_token_fn(theta, rows) for rows in splits)
        loss.backward()
        return loss.item(), theta.grad.item()

    def global_norm(theta, rows):
        return token_mean(theta * per_token_big[rows], total)

    def per_micro_batch(theta, rows):  # the wrong way: each micro-batch divided by its own count, averaged
        return token_mean(theta * per_token_big[rows], int(mask_big[rows].sum())) / 2

    one_batch = grads(global_norm, [slice(0, 4)])
    accumulated = grads(global_norm, [slice(0, 2), slice(2, 4)])
    assert one_batch[0] == pytest.approx(hand) and one_batch[1] == pytest.approx(hand)
    assert accumulated == pytest.approx(one_batch)
    assert grads(per_micro_batch, [slice(0, 2), slice(2, 4)])[0] != pytest.approx(hand)
    assert token_mean(per_token_big, 0).item() == 0.0


def test_gkd_mix_fraction_and_determinism():
    draws = 20_000
    for lam in (0.0, 0.3, 0.8, 1.0):
        rng = random.Random(21)
        fraction = sum(gkd_mix(rng, lam) for _ in range(draws)) / draws
        assert fraction == pytest.approx(lam, abs=0.015)
    rng_a, rng_b = random.Random(22), random.Random(22)
    first = [gkd_mix(rng_a, 0.5) for _ in range(50)]
    second = [gkd_mix(rng_b, 0.5) for _ in range(50)]
    assert first == second and 0 < sum(first) < len(first)
    # One draw per call whatever λ is, so the RNG stream does not depend on λ.
    a, b = random.Random(23), random.Random(23)
    gkd_mix(a, 0.0)
    gkd_mix(b, 1.0)
    assert a.random() == b.random()
    with pytest.raises(ValueError, match="lam"):
        gkd_mix(random.Random(0), 1.5)


def test_log1mexp_is_finite_and_accurate():
    x = torch.tensor([-1e-9, -1e-3, -0.5, -0.7, -5.0, -50.0, 0.0, 1e-7, float("-inf")], dtype=torch.float64)
    x.requires_grad_()
    y = losses._log1mexp(x)
    for xi, yi in zip(x.tolist()[:6], y.tolist()[:6], strict=True):
        assert yi == pytest.approx(math.log(-math.expm1(xi)), rel=1e-12)
    assert y[6].item() == y[7].item() == pytest.approx(TAIL_LOGPROB_FLOOR)
    assert y[8].item() == 0.0
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
