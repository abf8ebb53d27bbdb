"""TA-OPD: apply the loss only to the step's most teachable tokens.

Wang et al. 2026, "Not All Disagreement Is Learnable: Token Teachability in On-Policy Distillation"
(arXiv 2605.26844). Raw teacher–student disagreement mixes learnable corrections (the teacher moves mass
among candidates the student already considers) with incompatible ones (the teacher's mass sits off the
student's support). Teachability keeps the first kind. Here, per completion position t:

    d_t = KL(p_t ‖ q_t) on the teacher's top-k + tail buckets    (the KL a step at t could remove)
    c_t = Σ_{v ∈ top-k(p_t) ∩ top-K_s(q_t)} p_t(v)               (teacher mass on the student's top-K_s)
    τ_t = d_t · c_t

p = teacher, q = student. c_t is computed from the teacher's top-k only (all the service returns), so it
is a lower bound of the teacher mass on the student's top-K_s. Scaling d or c by a positive constant (the
paper normalises both) does not change which tokens rank highest, so the product is used as is.

Selection is over the whole optimizer step: of the N eligible tokens (real completion tokens the other
options kept), the ⌈ρ·N⌉ with the largest τ get weight 1, the rest 0; ties go to the earlier token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opd_student import losses


@torch.no_grad()
def teachability(
    student_logprobs_B_T_V: Tensor,
    teacher_top_ids_B_T_K: Tensor,
    teacher_top_logprobs_B_T_K: Tensor,
    teacher_tail_logprob_B_T: Tensor,
    mask_B_T: Tensor,
    student_top_k: int,
) -> Tensor:
    """τ_B_T = d_t · c_t (see the module docstring); 0 at padding. No gradient."""
    valid_B_T = mask_B_T > 0
    log_q_B_T_V = student_logprobs_B_T_V.detach().float()
    disagreement_B_T = losses.topk_forward_kl(
        log_q_B_T_V, teacher_top_ids_B_T_K, teacher_top_logprobs_B_T_K, teacher_tail_logprob_B_T, mask_B_T
    )
    student_top_B_T_S = log_q_B_T_V.topk(min(student_top_k, log_q_B_T_V.shape[-1]), dim=-1).indices
    teacher_ids_B_T_K = teacher_top_ids_B_T_K.long()
    in_student_top_B_T_K = (teacher_ids_B_T_K[..., :, None] == student_top_B_T_S[..., None, :]).any(-1)
    # Padding may hold garbage logprobs (-inf, NaN): zero them before exp.
    p_top_B_T_K = torch.where(valid_B_T[..., None], teacher_top_logprobs_B_T_K.float(), -math.inf).exp()
    compatibility_B_T = (p_top_B_T_K * in_student_top_B_T_K).sum(-1)
    return torch.where(valid_B_T, disagreement_B_T * compatibility_B_T, 0.0)


def top_fraction(scores_N: Tensor, eligible_N: Tensor, fraction: float) -> Tensor:
    """Boolean mask of the ⌈fraction·n⌉ highest scores among the n eligible entries (at least one when
    n > 0); ties are broken towards the lower index, so the choice is deterministic."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    eligible_N = eligible_N.bool()
    n = int(eligible_N.sum())
    chosen_N = torch.zeros_like(eligible_N)
    if n == 0:
        return chosen_N
    keep = max(1, math.ceil(fraction * n - 1e-9))
    ranked_N = torch.where(eligible_N, scores_N.double(), -math.inf)
    order_N = torch.sort(ranked_N, descending=True, stable=True).indices
    chosen_N[order_N[:keep]] = True
    return chosen_N
