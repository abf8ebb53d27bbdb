"""Temporal credit for the sampled-token reward r_t = log p(x_t) − log q(x_t) (p = teacher, q = student):
which advantage A_t each completion token's policy gradient −A_t log q(x_t) gets. Pure functions of [B, T]
tensors; real tokens are where mask_B_T > 0 (right padding, as the trainer packs them).

- `topk_value`: V(s_t) = −KL(q_t ‖ p_t) on the teacher's top-k + tail buckets. vOPD (Oh et al. 2026, *KL for
  a KL: On-Policy Distillation with Control Variate Baseline*, arXiv 2605.07865) shows the OPD value is the
  per-token negative reverse KL, available from the forward pass, and that a top-k version of it serves
  as well; we use it as the critic of GAE.
- `gae_advantages` (GAE-OPD): A_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γ V(s_{t+1}) − V(s_t), V = 0 after the
  last token (Schulman et al. 2016, arXiv 1506.02438). No paper text named "GAE-OPD" could be found; this
  is our reading: GAE over OPD's per-token rewards with vOPD's closed-form value as the critic (no learned
  value head). λ = 1 gives the discounted return-to-go minus V(s_t) (unbiased: the baseline does not
  depend on x_t); λ = 0 the one-step TD error. V is the expected *immediate* reward, so for γ > 0 and
  λ < 1 the estimate is biased by what V leaves out of the future, as GAE always is by its critic's error.
- `near_future_advantages` / `near_future_keep` (TOPD's near-future guidance, our reading of Jiang & Ferraro
  2026, *Bridging Reasoning Trajectories in On-Policy Distillation via Near-Future Guidance*, arXiv
  2606.00305; only its abstract could be read): a state is "really divergent" when the distribution-level
  divergence d_t = KL(q_t ‖ p_t) stays high over the next W tokens, D_t = mean_{k<W} d_{t+k} > τ; a
  high-loss token (−r_t > τ) at a state that is not divergent is a surface-form mismatch and gets no loss;
  and the guidance is spread over the near future: A_t = mean_{k<W} r_{t+k} over the real tokens of the
  window.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd_student.losses import TAIL_LOGPROB_FLOOR


@torch.no_grad()
def topk_reverse_kl(
    student_logprobs_B_T_V: Tensor,
    teacher_top_ids_B_T_K: Tensor,
    teacher_top_logprobs_B_T_K: Tensor,
    teacher_tail_logprob_B_T: Tensor,
    mask_B_T: Tensor,
) -> Tensor:
    """KL(q_t ‖ p_t) on the teacher's K ids + one tail bucket (no gradient), 0 at padding:

    Σ_k q_k (log q_k − log p_k) + q_tail (log q_tail − log p_tail),  q_tail = 1 − Σ_k q_k.
    """
    valid_B_T = mask_B_T > 0
    ids_B_T_K = teacher_top_ids_B_T_K.long().masked_fill(~valid_B_T[..., None], 0)
    log_q_B_T_K = student_logprobs_B_T_V.detach().float().gather(-1, ids_B_T_K).clamp_min(TAIL_LOGPROB_FLOOR)
    log_p_B_T_K = teacher_top_logprobs_B_T_K.float().clamp_min(TAIL_LOGPROB_FLOOR)
    q_tail_B_T = (1 - log_q_B_T_K.exp().sum(-1)).clamp_min(torch.finfo(torch.float32).tiny)
    log_p_tail_B_T = teacher_tail_logprob_B_T.float().clamp_min(TAIL_LOGPROB_FLOOR)
    kl_B_T = (log_q_B_T_K.exp() * (log_q_B_T_K - log_p_B_T_K)).sum(-1) + q_tail_B_T * (
        q_tail_B_T.log() - log_p_tail_B_T
    )
    return torch.where(valid_B_T, kl_B_T, 0.0)


def topk_value(*args: Tensor) -> Tensor:
    """V(s_t) = −KL(q_t ‖ p_t) on the teacher's top-k buckets (vOPD's value, top-k); args as topk_reverse_kl."""
    return -topk_reverse_kl(*args)


@torch.no_grad()
def gae_advantages(
    rewards_B_T: Tensor, values_B_T: Tensor, mask_B_T: Tensor, gamma: float, lam: float
) -> Tensor:
    """A_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γ V_{t+1} − V_t over each row's real tokens (V = 0 past the
    last one); 0 at padding."""
    valid_B_T = mask_B_T > 0
    r_B_T = torch.where(valid_B_T, rewards_B_T.float(), 0.0)
    v_B_T = torch.where(valid_B_T, values_B_T.float(), 0.0)
    advantages_B_T = torch.zeros_like(r_B_T)
    next_value_B = torch.zeros_like(r_B_T[:, 0])
    running_B = torch.zeros_like(r_B_T[:, 0])
    for t in reversed(range(r_B_T.shape[1])):
        valid_B = valid_B_T[:, t]
        delta_B = r_B_T[:, t] + gamma * next_value_B - v_B_T[:, t]
        running_B = torch.where(valid_B, delta_B + gamma * lam * running_B, running_B)
        next_value_B = torch.where(valid_B, v_B_T[:, t], next_value_B)
        advantages_B_T[:, t] = torch.where(valid_B, running_B, 0.0)
    return advantages_B_T


def _window_mean(values_B_T: Tensor, mask_B_T: Tensor, window: int) -> Tensor:
    """mean_{k<W} x_{t+k} over the real tokens of [t, t + W) (the window shrinks at the end); 0 at padding."""
    valid_B_T = (mask_B_T > 0).float()
    x_B_T = values_B_T.float() * valid_B_T
    T = x_B_T.shape[1]
    sums_B_T = torch.zeros_like(x_B_T)
    counts_B_T = torch.zeros_like(x_B_T)
    for k in range(min(window, T)):
        sums_B_T[:, : T - k] += x_B_T[:, k:]
        counts_B_T[:, : T - k] += valid_B_T[:, k:]
    return torch.where(valid_B_T > 0, sums_B_T / counts_B_T.clamp_min(1), 0.0)


@torch.no_grad()
def near_future_advantages(rewards_B_T: Tensor, mask_B_T: Tensor, window: int) -> Tensor:
    """A_t = mean of r over the real tokens of [t, t + W)."""
    return _window_mean(rewards_B_T, mask_B_T, window)


@torch.no_grad()
def near_future_keep(
    rewards_B_T: Tensor, divergence_B_T: Tensor, mask_B_T: Tensor, window: int, threshold: float
) -> Tensor:
    """1.0 except at high-loss tokens (−r_t > τ) whose near-future divergence mean_{k<W} d_{t+k} ≤ τ; 0 at
    padding."""
    valid_B_T = mask_B_T > 0
    divergent_B_T = _window_mean(divergence_B_T, mask_B_T, window) > threshold
    high_loss_B_T = -rewards_B_T.float() > threshold
    return (valid_B_T & ~(high_loss_B_T & ~divergent_B_T)).float()
