"""Off-policy correction of the sampled-token loss: rollouts sampled `max_staleness` steps ago come from an
older policy μ than the student q_θ being trained, so the per-token policy gradient is reweighted by the
importance ratio ρ_t = q_θ(x_t) / μ(x_t), with μ(x_t) recorded at sampling time (Rollout.behaviour_logprobs).

Every function is a pure per-token loss [B, T] (masked, padding never reaches the arithmetic) whose
gradient, with A_t the detached advantage, is:

- `truncated_is_loss`  ℓ_t = −sg(min(ρ_t, C)) · A_t · log q_θ(x_t)
  truncated importance sampling (tinker-cookbook's `importance_sampling` loss is the untruncated ρ_t A_t;
  truncation at C bounds the variance a rare token can add, as IMPALA / TIS do);
- `ppo_clip_loss`       ℓ_t = −min(ρ_t A_t, clip(ρ_t, 1 − ε, 1 + ε) A_t)
  PPO's clipped surrogate (Schulman et al. 2017, arXiv 1707.06347): no gradient once the ratio has left
  [1 − ε, 1 + ε] in the direction the advantage pushes;
- `drpo_loss`           ℓ_t = −ρ_t A_t + |A_t| (q_θ(x_t) − μ(x_t))² / (2 δ μ(x_t))
  our reading of DRPO (Yao et al. 2026, *Rethinking the Divergence Regularization in LLM RL*, arXiv
  2606.09821): DPPO's trust region is the sampled token's absolute probability shift |q_θ − μ| ≤ δ, and
  DRPO replaces its hard mask by "a smooth advantage-weighted quadratic regularizer on policy shift". We
  scale the quadratic so that the gradient with respect to q_θ(x_t),
      (A_t / μ) · (1 − sign(A_t) (q_θ − μ) / δ),
  equals the on-policy one at q_θ = μ, falls linearly to 0 exactly at DPPO's boundary in the direction the
  advantage pushes, and turns corrective beyond it (the paper's "bounded, continuous gradient weights that
  attenuate diverging updates and provide corrective signals beyond the boundary"). The paper's own
  constant could not be read; this scaling is ours.

Ratios are computed in log space and the log ratio clamped to ±20 before exp (a stale token whose
probability collapsed would otherwise overflow); `ratio_stats` reports what the correction did.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MAX_LOG_RATIO = 20.0


def log_ratio(student_logprobs_B_T: Tensor, behaviour_logprobs_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    """log ρ_t = log q_θ(x_t) − log μ(x_t), with gradient through q_θ; 0 at padding, clamped to ±20."""
    valid_B_T = mask_B_T > 0
    log_q_B_T = torch.where(valid_B_T, student_logprobs_B_T.float(), 0.0)
    log_mu_B_T = torch.where(valid_B_T, behaviour_logprobs_B_T.detach().float(), 0.0)
    return (log_q_B_T - log_mu_B_T).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)


def truncated_is_loss(
    student_logprobs_B_T: Tensor,
    behaviour_logprobs_B_T: Tensor,
    advantages_B_T: Tensor,
    mask_B_T: Tensor,
    cap: float,
) -> Tensor:
    """ℓ_t = −sg(min(ρ_t, C)) · A_t · log q_θ(x_t): the policy gradient reweighted by the truncated ratio."""
    valid_B_T = mask_B_T > 0
    weight_B_T = (
        log_ratio(student_logprobs_B_T, behaviour_logprobs_B_T, mask_B_T).detach().exp().clamp_max(cap)
    )
    log_q_B_T = torch.where(valid_B_T, student_logprobs_B_T.float(), 0.0)
    adv_B_T = torch.where(valid_B_T, advantages_B_T.detach().float(), 0.0)
    return torch.where(valid_B_T, -weight_B_T * adv_B_T * log_q_B_T, 0.0)


def ppo_clip_loss(
    student_logprobs_B_T: Tensor,
    behaviour_logprobs_B_T: Tensor,
    advantages_B_T: Tensor,
    mask_B_T: Tensor,
    epsilon: float,
) -> Tensor:
    """ℓ_t = −min(ρ_t A_t, clip(ρ_t, 1 − ε, 1 + ε) A_t), gradient through ρ_t."""
    valid_B_T = mask_B_T > 0
    ratio_B_T = log_ratio(student_logprobs_B_T, behaviour_logprobs_B_T, mask_B_T).exp()
    adv_B_T = torch.where(valid_B_T, advantages_B_T.detach().float(), 0.0)
    surrogate_B_T = torch.minimum(ratio_B_T * adv_B_T, ratio_B_T.clamp(1 - epsilon, 1 + epsilon) * adv_B_T)
    return torch.where(valid_B_T, -surrogate_B_T, 0.0)


def drpo_loss(
    student_logprobs_B_T: Tensor,
    behaviour_logprobs_B_T: Tensor,
    advantages_B_T: Tensor,
    mask_B_T: Tensor,
    delta: float,
) -> Tensor:
    """ℓ_t = −ρ_t A_t + |A_t| (q_θ(x_t) − μ(x_t))² / (2 δ μ(x_t)) (module docstring: our reading of DRPO)."""
    valid_B_T = mask_B_T > 0
    ratio_B_T = log_ratio(student_logprobs_B_T, behaviour_logprobs_B_T, mask_B_T).exp()
    mu_B_T = torch.where(valid_B_T, behaviour_logprobs_B_T.detach().float(), 0.0).exp()
    adv_B_T = torch.where(valid_B_T, advantages_B_T.detach().float(), 0.0)
    # (q − μ)² / μ = μ (ρ − 1)²: written with the ratio, so a tiny μ never divides
    penalty_B_T = adv_B_T.abs() * mu_B_T * (ratio_B_T - 1) ** 2 / (2 * delta)
    return torch.where(valid_B_T, -ratio_B_T * adv_B_T + penalty_B_T, 0.0)


@torch.no_grad()
def ratio_stats(
    student_logprobs_B_T: Tensor,
    behaviour_logprobs_B_T: Tensor,
    advantages_B_T: Tensor,
    mask_B_T: Tensor,
    kind: str,
    bound: float,
) -> tuple[float, float, float, float]:
    """(Σ ρ, Σ |log ρ|, tokens the correction acted on, max ρ) over the real tokens: truncated (ρ > C),
    clipped (ρ outside [1 − ε, 1 + ε] in the advantage's direction), or past DRPO's boundary
    (sign(A)(q − μ) > δ)."""
    valid_B_T = mask_B_T > 0
    log_rho_B_T = log_ratio(student_logprobs_B_T, behaviour_logprobs_B_T, mask_B_T)
    rho_B_T = log_rho_B_T.exp()
    adv_B_T = advantages_B_T.float()
    if kind == "truncate":
        acted_B_T = rho_B_T > bound
    elif kind == "clip":
        acted_B_T = ((adv_B_T > 0) & (rho_B_T > 1 + bound)) | ((adv_B_T < 0) & (rho_B_T < 1 - bound))
    else:
        mu_B_T = torch.where(valid_B_T, behaviour_logprobs_B_T.float(), 0.0).exp()
        acted_B_T = torch.sign(adv_B_T) * mu_B_T * (rho_B_T - 1) > bound
    return (
        float(rho_B_T[valid_B_T].sum()),
        float(log_rho_B_T[valid_B_T].abs().sum()),
        float((acted_B_T & valid_B_T).sum()),
        float(rho_B_T[valid_B_T].max()) if valid_B_T.any() else 0.0,
    )


def behaviour_tensor(behaviour_N: list[list[float] | None], horizon: int) -> Tensor:
    """Rows' recorded log μ padded to [B, T] (0 at padding); a row without a record is refused."""
    out_B_T = torch.zeros((len(behaviour_N), horizon))
    for b, row in enumerate(behaviour_N):
        if row is None:
            raise ValueError(
                "a rollout carries no behaviour logprobs: the off-policy correction needs rollouts sampled "
                "by the student with recording on (GKD dataset sequences have none)"
            )
        out_B_T[b, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out_B_T
