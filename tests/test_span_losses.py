"""The cross-tokenizer losses (opd_student.span_losses) against direct computations on hand-made tensors."""

from __future__ import annotations

import torch

from opd_student import losses
from opd_student.span_losses import span_reverse_kl_advantages, uld_rest_l1


def test_span_advantage_is_the_spans_teacher_minus_student_logprob():
    # two rollouts; rollout 0: spans {0,1}, {2}; rollout 1: span {0}, then padding
    q_B_T = torch.tensor([[-1.0, -2.0, -0.5], [-0.25, 0.0, 0.0]])
    span_B_T = torch.tensor([[0, 0, 1], [0, 0, 0]])
    teacher_B_G = torch.tensor([[-2.5, -1.5], [-1.0, 0.0]])
    mask_B_T = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = span_reverse_kl_advantages(q_B_T, span_B_T, teacher_B_G, mask_B_T)
    want = torch.tensor([[-2.5 + 3.0, -2.5 + 3.0, -1.5 + 0.5], [-1.0 + 0.25, 0.0, 0.0]])
    torch.testing.assert_close(adv, want)


def test_one_token_spans_give_reverse_kls_per_token_advantages():
    q_B_T = torch.log(torch.rand(2, 5))
    p_B_T = torch.log(torch.rand(2, 5))
    mask_B_T = torch.ones(2, 5)
    span_B_T = torch.arange(5).repeat(2, 1)
    adv = span_reverse_kl_advantages(q_B_T, span_B_T, p_B_T, mask_B_T)
    torch.testing.assert_close(adv, losses.reverse_kl_advantages(q_B_T, p_B_T, mask_B_T))


def direct_uld(q_V: torch.Tensor, p_top: list[float], top_ids: list[int | None]) -> float:
    """The formula written out for one position, in float64."""
    q = q_V.double()
    matched = [i for i in top_ids if i is not None]
    u = sorted((p for p, i in zip(p_top, top_ids, strict=True) if i is None), reverse=True)
    rest = q.clone()
    rest[matched] = 0
    v = sorted(rest.tolist(), reverse=True)[: len(u)]
    p_rest = 1 - sum(p for p, i in zip(p_top, top_ids, strict=True) if i is not None)
    q_rest = 1 - float(q[matched].sum()) if matched else 1.0
    head = sum(abs(a - b) for a, b in zip(u, v, strict=True))
    return head + abs((p_rest - sum(u)) - (q_rest - sum(v)))


def test_uld_rest_against_a_direct_computation_and_its_gradient_flows_to_the_student():
    torch.manual_seed(0)
    V = 12
    logits = torch.randn(1, 2, V, requires_grad=True)
    log_q = torch.log_softmax(logits, -1)
    p_top = [[0.4, 0.2, 0.1, 0.05], [0.6, 0.1, 0.05, 0.01]]
    top_ids = [[3, None, 7, None], [None, None, 0, 11]]  # None: the teacher's string is no student token
    teacher_lp = torch.log(torch.tensor(p_top))[None]
    ids = torch.tensor([[[i if i is not None else 0 for i in row] for row in top_ids]])
    matched = torch.tensor([[[i is not None for i in row] for row in top_ids]])
    out = uld_rest_l1(log_q, teacher_lp, ids, matched, torch.ones(1, 2))
    for t in range(2):
        want = direct_uld(log_q[0, t].detach().exp(), p_top[t], top_ids[t])
        assert abs(out[0, t].item() - want) < 1e-5
    out.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_uld_rest_is_zero_for_equal_sorted_rests_and_masks_padding():
    # the student puts the teacher's unmatched probabilities on other ids, in another order: ULD sees no gap
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    log_q = torch.log(torch.tensor([[[0.05, 0.15, 0.3, 0.5]]]))
    teacher = torch.log(p)[None, None]
    ids = torch.zeros(1, 1, 4, dtype=torch.long)
    none = torch.zeros(1, 1, 4, dtype=torch.bool)
    assert uld_rest_l1(log_q, teacher, ids, none, torch.ones(1, 1)).abs().item() < 1e-6
    assert uld_rest_l1(log_q, teacher, ids, none, torch.zeros(1, 1)).item() == 0.0
