"""The exact full-vocabulary losses (opd_student.exact_losses) against a direct computation.

The direct computation holds the teacher's whole [B, T, V] in float64 and writes each divergence out; the
losses under test compute the teacher block by block (3 positions here, so blocks straddle rows and
padding) in float32 with recomputation in backward. Tolerances: fp32 log-softmax over V = 97 ids and
sums of ≤ 97 terms, ~1e-6 relative; 1e-5 absolute leaves room and is far below a wrong formula's error
(a missing temperature, a swapped KL direction or the teacher's gradient: ≥ 1e-2 here).
"""

from __future__ import annotations

import math

import pytest
import torch

from opd_client.head import TeacherHead
from opd_student.exact_losses import block_positions_for, exact_divergence, exact_kls, rows_by_teacher

B, T, V, D = 3, 5, 97, 8
TOL = 1e-5


def make_head(
    bias: bool, logit_scale: float = 1.0, softcap: float | None = None, vocab: int = V
) -> TeacherHead:
    g = torch.Generator().manual_seed(1)
    return TeacherHead(
        model="t",
        weight_V_D=torch.randn(vocab, D, generator=g),
        bias_V=torch.randn(vocab, generator=g) if bias else None,
        logit_scale=logit_scale,
        final_logit_softcapping=softcap,
        tokenizer_vocab_size=vocab,
        sha256="",
    )


def batch():
    """Student log q [B, T, V] (a leaf with grad), teacher hidden states, and a padded mask."""
    g = torch.Generator().manual_seed(0)
    logits = (2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).requires_grad_()
    hidden = torch.randn(B, T, D, generator=g)
    mask = torch.ones(B, T)
    mask[1, 3:] = 0  # padded rows: their hidden states are zeros, as teacher_tensors pads them
    mask[2, 1:] = 0
    hidden[mask == 0] = 0
    return logits, hidden, mask


def direct(lq, hidden, head: TeacherHead, mask, kind: str, beta: float, temperature: float):
    """float64, the whole [B, T, V] at once, each divergence written out."""
    raw = hidden.double() @ head.weight_V_D.double().T
    if head.bias_V is not None:
        raw = raw + head.bias_V.double()
    raw = raw * head.logit_scale
    if head.final_logit_softcapping:
        c = head.final_logit_softcapping
        raw = torch.tanh(raw / c) * c
    lp = torch.log_softmax(raw / temperature, -1)
    lq = torch.log_softmax(lq / temperature, -1)
    p, q = lp.exp(), lq.exp()
    if kind == "reverse_kl":
        out = (q * (lq - lp)).sum(-1)
    elif kind == "forward_kl":
        out = (p * (lp - lq)).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        out = beta * (p * (lp - m.log())).sum(-1) + (1 - beta) * (q * (lq - m.log())).sum(-1)
    return out * mask


CASES = [
    ("reverse_kl", 0.5, 1.0, dict(bias=False)),
    ("reverse_kl", 0.5, 0.7, dict(bias=True, logit_scale=0.5)),
    ("forward_kl", 0.5, 1.0, dict(bias=True)),
    ("forward_kl", 0.5, 1.6, dict(bias=False, softcap=3.0)),
    ("jsd", 0.5, 1.0, dict(bias=False)),
    ("jsd", 0.2, 0.8, dict(bias=True)),
    ("jsd", 0.9, 1.3, dict(bias=False, logit_scale=2.0)),
]


@pytest.mark.parametrize(("kind", "beta", "temperature", "head_args"), CASES)
def test_each_loss_and_its_gradient_equal_the_direct_computation(kind, beta, temperature, head_args):
    head = make_head(**head_args)
    logits, hidden, mask = batch()
    weights = torch.rand(
        B, T, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )  # token weights

    lq = torch.log_softmax(logits.float(), -1)  # what MicroBatch gives: fp32 log q
    got = exact_divergence(lq, hidden, head, mask, kind, beta, temperature, block_positions=3)
    (grad_got,) = torch.autograd.grad((got.double() * weights).sum(), logits)

    want = direct(torch.log_softmax(logits, -1), hidden, head, mask, kind, beta, temperature)
    (grad_want,) = torch.autograd.grad((want * weights).sum(), logits)

    assert got.shape == (B, T) and bool((got[mask == 0] == 0).all())
    assert torch.allclose(got.double(), want, atol=TOL, rtol=0), (got - want).abs().max()
    assert torch.allclose(grad_got, grad_want, atol=TOL, rtol=0), (grad_got - grad_want).abs().max()
    assert bool((grad_got[mask == 0] == 0).all())  # padding gets no gradient
    assert want[mask > 0].min() > 1e-2  # the test can tell: every real position is far from 0


def test_the_reverse_kl_gradient_is_q_times_log_ratio_plus_one():
    """∂/∂(log q_v) Σ q (log q − log p) = q_v (log q_v − log p_v + 1), the closed form."""
    head = make_head(bias=True)
    _, hidden, _ = batch()
    lq = torch.log_softmax(torch.randn(1, 2, V, dtype=torch.float32), -1).requires_grad_()
    got = exact_divergence(lq, hidden[:1, :2], head, torch.ones(1, 2), "reverse_kl")
    (grad,) = torch.autograd.grad(got.sum(), lq)
    lp = torch.log_softmax(hidden[:1, :2] @ head.weight_V_D.T + head.bias_V, -1)
    closed = lq.exp() * (lq - lp + 1)
    assert torch.allclose(grad, closed.detach(), atol=1e-6)


def test_block_size_does_not_change_the_result():
    head = make_head(bias=True)
    logits, hidden, mask = batch()
    lq = torch.log_softmax(logits.float(), -1)
    results = [exact_divergence(lq, hidden, head, mask, "jsd", block_positions=n) for n in (1, 4, 1000)]
    for r in results[1:]:
        assert torch.allclose(r, results[0], atol=1e-6)


def test_a_head_with_padded_rows_is_cut_to_the_tokenizer():
    """A teacher whose head has 3 padding rows beyond the tokenizer's 97 ids, against a student with 97."""
    padded = make_head(bias=False, vocab=V + 3)
    padded = TeacherHead(padded.model, padded.weight_V_D, None, 1.0, None, V, "")
    logits, hidden, mask = batch()
    lq = torch.log_softmax(logits.float(), -1)
    got = exact_divergence(lq, hidden, padded, mask, "forward_kl")
    cut = TeacherHead("t", padded.weight_V_D[:V], None, 1.0, None, V, "")
    assert torch.allclose(got, exact_divergence(lq, hidden, cut, mask, "forward_kl"), atol=1e-6)
    with pytest.raises(ValueError, match="cannot be lined up"):
        exact_divergence(lq[..., :50], hidden, padded, mask)


def test_kl_of_a_distribution_with_itself_is_zero():
    head = make_head(bias=True, logit_scale=0.3)
    _, hidden, mask = batch()
    lp = torch.log_softmax((hidden @ head.weight_V_D.T + head.bias_V) * 0.3, -1)
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        got = exact_divergence(lp, hidden, head, mask, kind)
        assert got.abs().max() < 1e-5, kind
    assert math.isfinite(float(got.sum()))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_evaluations_two_kls_in_one_pass_equal_the_direct_computation(temperature):
    head = make_head(bias=True, logit_scale=0.5)
    logits, hidden, mask = batch()
    lq = torch.log_softmax(logits.detach().float(), -1)
    reverse, forward = exact_kls(lq, hidden, head, mask, temperature, block_positions=4)
    for kind, got in (("reverse_kl", reverse), ("forward_kl", forward)):
        want = direct(torch.log_softmax(logits.detach(), -1), hidden, head, mask, kind, 0.5, temperature)
        assert torch.allclose(got.double(), want, atol=TOL, rtol=0), kind
    assert not torch.allclose(reverse, forward, atol=1e-2)  # the two directions really differ here


def test_rows_by_teacher_groups_each_teachers_rows_in_order():
    assert rows_by_teacher([None, None]) == [(None, None)]
    groups = rows_by_teacher(["a", "b", "a", None])
    assert [(name, rows.tolist()) for name, rows in groups] == [("a", [0, 2]), ("b", [1]), (None, [3])]


def test_a_block_holds_at_most_2_to_the_22_elements_at_any_vocabulary():
    assert block_positions_for(49_152) == 85 and block_positions_for(151_936) == 27
    assert block_positions_for(10**8) == 1 and block_positions_for(V) * V <= 1 << 22
