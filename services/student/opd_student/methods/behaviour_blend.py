"""TRB, trust-region behaviour blending (Plyusov et al. 2026, *Trust-Region Behavior Blending for On-Policy
Distillation*, arXiv 2605.31159): during a warm-up, rollouts are sampled not from the student q but from

    μ* = argmin_μ KL(μ ‖ p)  subject to  KL(μ ‖ q) ≤ ε_k

at every prefix ("the closest-to-teacher behavior policy inside a student-centered KL trust region"), while
the per-prefix reverse-KL OPD loss stays as it is; the budget ε_k is annealed to zero, after which rollouts
are the student's own. The solution family is the geometric blend

    μ_β ∝ q^(1−β) · p^β,   β = the largest value in [0, 1] with KL(μ_β ‖ q) ≤ ε_k,

found by bisection (the paper: "a closed-form interpolation ... the interpolation coefficient is determined
by the largest feasible value"; KL(μ_β ‖ q) grows with β). Our choices, where the text we could read is not
explicit: ε_k = ε · max(0, 1 − k / K) (a linear anneal over `trb_steps` = K), and the teacher's
distribution comes from the service's top-k answer at the prefix (`top_k` ids and the tail mass), the tail
spread over the other ids in proportion to the student's probabilities:

    p̂(v) = p(v) for v in the teacher's top-k,   p̂(v) = p_tail · q(v) / Σ_{u ∉ top-k} q(u) otherwise.

Both q and p̂ are at the sampling temperature's q (softmax(z / T)). The sampled token's log μ_β is recorded
as the rollout's behaviour logprob, so the off-policy correction can weight the loss by q_θ / μ.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from opd_student.losses import TAIL_LOGPROB_FLOOR
from opd_student.rollouts import SeededGumbel

# The teacher's next-token answer for B prefixes: (top ids [B, K], top logprobs [B, K], tail logprob [B]).
TeacherNext = Callable[[list[list[int]], list[int]], tuple[Tensor, Tensor, Tensor]]


def budget(step_index: int, epsilon: float, steps: int) -> float:
    """ε_k = ε · max(0, 1 − k / K): the KL budget of the step with 0-based index k."""
    return epsilon * max(0.0, 1.0 - step_index / steps)


def teacher_full_logprobs(
    log_q_B_V: Tensor, top_ids_B_K: Tensor, top_lp_B_K: Tensor, tail_B: Tensor
) -> Tensor:
    """log p̂ over the whole vocabulary: the teacher's top-k as given, its tail mass spread over the other
    ids in proportion to q."""
    log_q_B_V = log_q_B_V.float()
    in_top_B_V = torch.zeros_like(log_q_B_V, dtype=torch.bool).scatter_(-1, top_ids_B_K.long(), True)
    log_q_out_B = torch.where(in_top_B_V, -torch.inf, log_q_B_V).logsumexp(-1)
    tail_B = tail_B.float().clamp_min(TAIL_LOGPROB_FLOOR)
    log_p_B_V = log_q_B_V + (tail_B - log_q_out_B)[:, None]
    return log_p_B_V.scatter(-1, top_ids_B_K.long(), top_lp_B_K.float().clamp_min(TAIL_LOGPROB_FLOOR))


def blend(log_q_B_V: Tensor, log_p_B_V: Tensor, beta_B: Tensor) -> Tensor:
    """log μ_β = log_softmax((1 − β) log q + β log p̂)."""
    beta_B1 = beta_B.float()[:, None]
    return torch.log_softmax((1 - beta_B1) * log_q_B_V + beta_B1 * log_p_B_V, dim=-1)


def kl_to_student(log_mu_B_V: Tensor, log_q_B_V: Tensor) -> Tensor:
    """KL(μ ‖ q) per row."""
    return (log_mu_B_V.exp() * (log_mu_B_V - log_q_B_V)).sum(-1)


def largest_beta(log_q_B_V: Tensor, log_p_B_V: Tensor, epsilon: float, iterations: int = 30) -> Tensor:
    """The largest β in [0, 1] with KL(μ_β ‖ q) ≤ ε, per row (bisection; β = 1 when the teacher itself fits)."""
    B = log_q_B_V.shape[0]
    ones_B = torch.ones(B)
    fits_all_B = kl_to_student(blend(log_q_B_V, log_p_B_V, ones_B), log_q_B_V) <= epsilon
    low_B, high_B = torch.zeros(B), ones_B.clone()
    for _ in range(iterations):
        mid_B = (low_B + high_B) / 2
        fits_B = kl_to_student(blend(log_q_B_V, log_p_B_V, mid_B), log_q_B_V) <= epsilon
        low_B = torch.where(fits_B, mid_B, low_B)
        high_B = torch.where(fits_B, high_B, mid_B)
    return torch.where(fits_all_B, ones_B, low_B)


class BlendedGumbel(SeededGumbel):
    """Seeded Gumbel-max sampling from μ_β instead of q (the same per-row noise streams), recording log μ_β
    of every sampled token. Rows that have ended (EOS) are left to the plain path: generate pads them."""

    def __init__(
        self,
        seeds: list[int],
        temperature: float,
        device: torch.device,
        epsilon: float,
        teacher_next: TeacherNext,
        rows_prompt_ids: list[list[int]],
        eos_token_id: int,
    ) -> None:
        super().__init__(seeds, temperature, device, record=True)
        self.epsilon, self.teacher_next = epsilon, teacher_next
        self.rows_prompt_ids, self.eos_token_id = rows_prompt_ids, eos_token_id
        self.beta_sum, self.beta_count = 0.0, 0
        self.teacher_positions = 0  # prefixes the teacher was asked about

    def __call__(self, input_ids: torch.Tensor, scores_B_V: torch.Tensor) -> torch.Tensor:
        V = scores_B_V.shape[-1]
        log_q_B_V = torch.log_softmax(scores_B_V.float().cpu() / self.temperature, dim=-1)
        generated_B = input_ids[:, self.prompt_width :].tolist()
        live = [b for b, ids in enumerate(generated_B) if self.eos_token_id not in ids]
        log_mu_B_V = log_q_B_V.clone()
        if live:
            top_ids_L_K, top_lp_L_K, tail_L = self.teacher_next([generated_B[b] for b in live], live)
            self.teacher_positions += len(live)
            log_p_L_V = teacher_full_logprobs(log_q_B_V[live], top_ids_L_K, top_lp_L_K, tail_L)
            beta_L = largest_beta(log_q_B_V[live], log_p_L_V, self.epsilon)
            log_mu_B_V[live] = blend(log_q_B_V[live], log_p_L_V, beta_L)
            self.beta_sum += float(beta_L.sum())
            self.beta_count += len(live)
        uniform_B_V = torch.stack(
            [torch.rand(V, generator=g, device=scores_B_V.device) for g in self.generators]
        )
        gumbel_B_V = -torch.log(-torch.log(uniform_B_V.clamp_min(1e-20)))
        perturbed_B_V = log_mu_B_V.to(scores_B_V.device) + gumbel_B_V
        chosen_B = perturbed_B_V.argmax(-1, keepdim=True)
        self.logprobs_S_B.append(log_mu_B_V.gather(-1, chosen_B.cpu())[:, 0])
        return perturbed_B_V
