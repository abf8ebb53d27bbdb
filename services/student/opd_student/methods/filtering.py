"""FiRe-OPD style: filter whole rollouts, then reweight the tokens of the ones kept.

Li et al. 2026, "Filter, Then Reweight: Rethinking Optimization Granularity in On-Policy Distillation"
(arXiv 2606.02684). Our version of the two stages:

1. filter: score each rollout i by the teacher's mean log-probability of its tokens,
   s_i = (1/T_i) Σ_t log p(x_t); drop the ⌊f·N⌋ rollouts with the lowest s_i (f = 0.2 by default) —
   trajectories the teacher finds implausible give unreliable supervision;
2. reweight: within the kept rollouts, token t gets w_t = c^T_t · (1 − c^S_t), where
   c^T_t = max_v p_t(v)       the teacher's confidence (how reliable its signal is at t), and
   c^S_t = q_t(argmax_v p_t)  the student's confidence in the teacher's choice (how much is left to learn).
   A token where the teacher is sure and the student is not weighs most; the trainer divides the weighted
   loss by Σ w, so only the relative weights matter.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rollout_keep_mask(teacher_mean_logprob_N: Tensor, drop_fraction: float) -> Tensor:
    """True for the rollouts kept: all but the ⌊f·N⌋ with the lowest teacher mean logprob (ties: the
    earlier rollout is dropped first)."""
    if not 0.0 <= drop_fraction < 1.0:
        raise ValueError(f"drop fraction must be in [0, 1); got {drop_fraction}")
    n = teacher_mean_logprob_N.shape[0]
    keep_N = torch.ones(n, dtype=torch.bool)
    drop = math.floor(drop_fraction * n + 1e-9)
    if drop:
        order_N = torch.sort(teacher_mean_logprob_N.double(), stable=True).indices
        keep_N[order_N[:drop]] = False
    return keep_N


def teacher_mean_logprobs(token_logprobs_N_T: list[Tensor]) -> Tensor:
    """s_i = mean over rollout i's completion tokens of the teacher's log p(x_t) (an empty rollout: 0)."""
    return torch.tensor([float(lp.double().mean()) if lp.numel() else 0.0 for lp in token_logprobs_N_T])


@torch.no_grad()
def confidence_weights(
    student_logprobs_B_T_V: Tensor,
    teacher_top_ids_B_T_K: Tensor,
    teacher_top_logprobs_B_T_K: Tensor,
    mask_B_T: Tensor,
) -> Tensor:
    """w_B_T = c^T · (1 − c^S) (module docstring); 0 at padding. No gradient."""
    valid_B_T = mask_B_T > 0
    # Padding may hold garbage (NaN, -inf, ids out of range): replace it before any arithmetic.
    top_lp_B_T_K = torch.where(valid_B_T[..., None], teacher_top_logprobs_B_T_K.float(), 0.0)
    best_lp_B_T, best_k_B_T = top_lp_B_T_K.max(-1)
    teacher_conf_B_T = best_lp_B_T.exp()
    top_id_B_T = teacher_top_ids_B_T_K.long().gather(-1, best_k_B_T[..., None])[..., 0]
    top_id_B_T = top_id_B_T.masked_fill(~valid_B_T, 0)
    student_conf_B_T = student_logprobs_B_T_V.detach().float().gather(-1, top_id_B_T[..., None])[..., 0].exp()
    return torch.where(valid_B_T, teacher_conf_B_T * (1.0 - student_conf_B_T).clamp_min(0.0), 0.0)
