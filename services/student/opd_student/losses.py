"""OPD losses: each a pure function of tensors, p = the teacher, q = the student.

Shapes: B sequences, T completion positions (padded), V vocabulary, K top-k ids. `mask_B_T` is 1.0 on real
completion tokens and 0.0 on padding. Every loss returns a per-token tensor `[B, T]` that is already
multiplied by the mask; the trainer sums it and divides by the token count of the whole optimizer step
(`token_mean`).

Padded positions may hold garbage (id 0 or -1, logprob 0, -inf or NaN from a teacher never asked about
them). It is replaced with `torch.where` *before* any arithmetic: multiplying by the mask afterwards is
not enough, because 0 * inf = nan in the forward pass and 0 * (a nan local gradient) = nan in backward.
Logprobs are floored at TAIL_LOGPROB_FLOOR (log of the smallest normal float32, the floor the teacher
service applies to its tail) so that a zero probability costs e^-87 instead of an infinite log.

Top-k losses compare distributions on K + 1 buckets: the K ids plus one tail bucket holding the rest of
the mass (log(1 - Σ_k p_k)). With K = V the tail holds ~e^-87 and the bucket KL is the full KL.
"""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor

# Same value as the teacher service's tail floor (opd_teacher.backends.topk; not imported: the trainer
# must not depend on the teacher package).
TAIL_LOGPROB_FLOOR = math.log(torch.finfo(torch.float32).tiny)  # ≈ -87.34
_TINY = torch.finfo(torch.float32).tiny
_LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------------------
# Normalisation and data mixing
# ---------------------------------------------------------------------------------------------------------


def token_mean(per_token_B_T: Tensor, num_tokens: int | float) -> Tensor:
    """Σ per_token_B_T / num_tokens, where num_tokens counts the completion tokens of the whole step.

    Under gradient accumulation an optimizer step sums the gradients of several micro-batches. If each
    micro-batch were divided by its own token count, a token in a short micro-batch would weigh more than
    one in a long micro-batch, and the step's loss would depend on how the batch was split. Dividing every
    micro-batch's sum by the step's total token count makes the accumulated gradient exactly that of one
    big batch's per-token mean. A step with no completion tokens gives 0 (still attached to the graph).
    """
    total_B_T = per_token_B_T.sum()
    if num_tokens <= 0:
        return total_B_T * 0.0
    return total_B_T / num_tokens


def gkd_mix(rng: random.Random, lam: float) -> bool:
    """True: this batch uses on-policy student rollouts; False: fixed dataset sequences (GKD's λ).

    Draws exactly one number from `rng` whatever λ is, so the RNG stream (saved in checkpoints) advances
    the same way for every λ, including 0 and 1. `random() < λ` is never true for λ = 0, always for λ = 1.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam (GKD on-policy fraction) must be in [0, 1], got {lam}")
    return rng.random() < lam


# ---------------------------------------------------------------------------------------------------------
# Sampled-token reverse KL (policy gradient)
# ---------------------------------------------------------------------------------------------------------


def sampled_reverse_kl(
    student_logprobs_B_T: Tensor, teacher_logprobs_B_T: Tensor, mask_B_T: Tensor
) -> Tensor:
    """Per-token log q(x_t) - log p(x_t) at the sampled tokens x_t ~ q: an unbiased estimate of KL(q‖p).

    q = student, p = teacher. This is the "sampled reverse KL" metric, −r_t of `reverse_kl_advantages`.
    Detached: its gradient w.r.t. the student is not the reverse-KL gradient (the samples depend on q
    too); train with `policy_gradient_loss` instead.
    """
    valid_B_T = mask_B_T > 0
    dtype = _compute_dtype(student_logprobs_B_T)
    log_q_B_T = _clean(student_logprobs_B_T.detach(), valid_B_T, dtype)
    log_p_B_T = _clean(teacher_logprobs_B_T.detach(), valid_B_T, dtype)
    return _masked(log_q_B_T - log_p_B_T, mask_B_T)


@torch.no_grad()
def reverse_kl_advantages(
    student_logprobs_B_T: Tensor, teacher_logprobs_B_T: Tensor, mask_B_T: Tensor, discount: float = 0.0
) -> Tensor:
    """Per-token advantages from the reward r_t = log p(x_t) − log q(x_t) (p = teacher, q = student).

    r_t is the negative sampled reverse KL at the student's own sample x_t ~ q. With discount γ = 0 the
    advantage is A_t = r_t (tinker-cookbook / Thinking Machines' on-policy distillation). With γ > 0 it is
    the discounted return-to-go within the sequence, A_t = Σ_{s ≥ t} γ^(n(s) − n(t)) r_s, where s runs over
    the real completion tokens only and n(s) counts them (padding or a hole in the mask neither adds
    reward nor uses up a discount step; for right padding n(s) − n(t) = s − t). No gradient.
    """
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    reward_B_T = -sampled_reverse_kl(student_logprobs_B_T, teacher_logprobs_B_T, mask_B_T)
    if discount == 0.0:
        return reward_B_T
    valid_B_T = mask_B_T > 0
    advantages_B_T = torch.zeros_like(reward_B_T)
    return_to_go_B = torch.zeros_like(reward_B_T[:, 0])
    for t in reversed(range(reward_B_T.shape[1])):
        valid_B = valid_B_T[:, t]
        return_to_go_B = torch.where(valid_B, reward_B_T[:, t] + discount * return_to_go_B, return_to_go_B)
        advantages_B_T[:, t] = torch.where(valid_B, return_to_go_B, 0.0)
    return advantages_B_T


def policy_gradient_loss(student_logprobs_B_T: Tensor, advantages_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    """Per-token REINFORCE loss −A_t · log q(x_t) (q = student; advantages detached).

    Its gradient is −A_t ∇log q(x_t), which with A_t from `reverse_kl_advantages` descends the sampled
    reverse KL(q‖p). Its value is not a KL; report `sampled_reverse_kl` instead.
    """
    valid_B_T = mask_B_T > 0
    dtype = _compute_dtype(student_logprobs_B_T)
    log_q_B_T = _clean(student_logprobs_B_T, valid_B_T, dtype)
    adv_B_T = torch.where(valid_B_T, advantages_B_T.detach().to(dtype), 0.0)
    return _masked(-adv_B_T * log_q_B_T, mask_B_T)


# ---------------------------------------------------------------------------------------------------------
# Top-k + tail losses
# ---------------------------------------------------------------------------------------------------------


def topk_forward_kl(
    student_logprobs_B_T_V: Tensor,
    teacher_top_ids_B_T_K: Tensor,
    teacher_top_logprobs_B_T_K: Tensor,
    teacher_tail_logprob_B_T: Tensor,
    mask_B_T: Tensor,
) -> Tensor:
    """Forward KL(p‖q) on the teacher's top-k plus a tail bucket (p = teacher, q = student).

        KL = Σ_k p_k (log p_k − log q_k) + p_tail (log p_tail − log q_tail)

    p_k: the teacher's top-k probabilities, p_tail = the teacher's reported tail (1 − Σ_k p_k, floored);
    q_k: the student at the teacher's top-k ids, q_tail = 1 − Σ_k q_k computed as log1mexp(logsumexp)
    and floored at e^-87. With K = V, p_tail ≈ e^-87 and this is exactly the full KL(p‖q).
    Gradient flows through q only.
    """
    valid_B_T = mask_B_T > 0
    dtype = _compute_dtype(student_logprobs_B_T_V)
    log_p_B_T_N = _teacher_buckets(teacher_top_logprobs_B_T_K, teacher_tail_logprob_B_T, valid_B_T, dtype)
    log_q_B_T_N = _student_buckets(student_logprobs_B_T_V, teacher_top_ids_B_T_K, valid_B_T, dtype)
    return _masked(_bucket_kl(log_p_B_T_N, log_q_B_T_N), mask_B_T)


def ragged_topk_forward_kl(
    student_logprobs_B_T_V: Tensor,
    teacher_ids_B_T_K: Tensor,
    teacher_logprobs_B_T_K: Tensor,
    present_B_T_K: Tensor,
    mask_B_T: Tensor,
) -> Tensor:
    """`topk_forward_kl` where each position has its own number of teacher alternatives (an API's top
    logprobs, of which only those naming a student id are kept): entries with present_B_T_K False count
    in neither distribution's top-k, so both tails hold their mass,

        KL = Σ_{k present} p_k (log p_k − log q_k) + p_tail (log p_tail − log q_tail),
        p_tail = 1 − Σ_{k present} p_k,  q_tail = 1 − Σ_{k present} q_k.

    Gradient flows through q only.
    """
    valid_B_T = mask_B_T > 0
    use_B_T_K = present_B_T_K.bool() & valid_B_T[..., None]
    dtype = _compute_dtype(student_logprobs_B_T_V)
    ids_B_T_K = teacher_ids_B_T_K.long().masked_fill(~use_B_T_K, 0)
    # Absent entries sit at e^-1e4 = 0 exactly: they add nothing to a sum, and every log stays finite
    # (a logsumexp over -inf alone would give a NaN gradient).
    log_p_B_T_K = _absent_to_zero_mass(teacher_logprobs_B_T_K.detach(), use_B_T_K, dtype)
    log_q_B_T_K = _absent_to_zero_mass(student_logprobs_B_T_V.gather(-1, ids_B_T_K), use_B_T_K, dtype)
    log_p_B_T_N = _with_tail(log_p_B_T_K, _tail_logprob(log_p_B_T_K))
    log_q_B_T_N = _with_tail(log_q_B_T_K, _tail_logprob(log_q_B_T_K))
    return _masked(_bucket_kl(log_p_B_T_N, log_q_B_T_N), mask_B_T)


_ABSENT_LOGPROB = -1e4


def _absent_to_zero_mass(logprobs: Tensor, present: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.where(present, logprobs.to(dtype).clamp_min(TAIL_LOGPROB_FLOOR), _ABSENT_LOGPROB)


def student_topk_reverse_kl(
    student_logprobs_B_T_V: Tensor,
    student_top_ids_B_T_K: Tensor,
    teacher_score_logprobs_B_T_K: Tensor,
    mask_B_T: Tensor,
) -> Tensor:
    """Reverse KL(q‖p) on the student's own top-k plus a tail bucket (p = teacher, q = student).

        KL = Σ_k q_k (log q_k − log p_k) + q_tail (log q_tail − log p_tail)

    q_k: the student at its own top-k ids, q_tail = 1 − Σ_k q_k; p_k: the teacher's logprobs of the same
    ids (the service's `score_ids` answer), p_tail = 1 − Σ_k p_k. Both tails via log1mexp(logsumexp),
    floored at e^-87. With K = V this is the full KL(q‖p). Gradient flows through q only.
    """
    valid_B_T = mask_B_T > 0
    dtype = _compute_dtype(student_logprobs_B_T_V)
    log_q_B_T_N = _student_buckets(student_logprobs_B_T_V, student_top_ids_B_T_K, valid_B_T, dtype)
    log_p_top_B_T_K = _clean(teacher_score_logprobs_B_T_K.detach(), valid_B_T[..., None], dtype)
    log_p_B_T_N = _with_tail(log_p_top_B_T_K, _tail_logprob(log_p_top_B_T_K))
    return _masked(_bucket_kl(log_q_B_T_N, log_p_B_T_N), mask_B_T)


def generalized_jsd(
    student_logprobs_B_T_V: Tensor,
    teacher_top_ids_B_T_K: Tensor,
    teacher_top_logprobs_B_T_K: Tensor,
    teacher_tail_logprob_B_T: Tensor,
    mask_B_T: Tensor,
    beta: float = 0.5,
) -> Tensor:
    """GKD's generalised Jensen-Shannon divergence JSD(β) on the teacher's top-k + tail buckets.

    Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
    Mistakes", eq. for D_JSD(β), with p = teacher and q = student (buckets as in `topk_forward_kl`):

        m = β p + (1 − β) q,    JSD_β = β KL(p‖m) + (1 − β) KL(q‖m)

    For 0 < β < 1 the value tends to 0 at both ends: JSD_β ≈ β KL(p‖q) as β → 0 and ≈ (1 − β) KL(q‖p) as
    β → 1, so JSD_β / β → forward KL(p‖q) and JSD_β / (1 − β) → reverse KL(q‖p). At exactly β = 0 we
    return the forward KL(p‖q) and at β = 1 the reverse KL(q‖p) (on the buckets), i.e. the normalised
    limits: the loss scale jumps at the endpoints. This is the same convention as TRL's
    GKDTrainer.generalized_jsd_loss (mixture (1−β)·student + β·teacher, β·KL(teacher‖m) +
    (1−β)·KL(student‖m), β = 0 → KL(teacher‖student), β = 1 → KL(student‖teacher)). β = 0.5 is the
    symmetric JSD. Gradient flows through q only.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    valid_B_T = mask_B_T > 0
    dtype = _compute_dtype(student_logprobs_B_T_V)
    log_p_B_T_N = _teacher_buckets(teacher_top_logprobs_B_T_K, teacher_tail_logprob_B_T, valid_B_T, dtype)
    log_q_B_T_N = _student_buckets(student_logprobs_B_T_V, teacher_top_ids_B_T_K, valid_B_T, dtype)
    if beta == 0.0:
        jsd_B_T = _bucket_kl(log_p_B_T_N, log_q_B_T_N)
    elif beta == 1.0:
        jsd_B_T = _bucket_kl(log_q_B_T_N, log_p_B_T_N)
    else:
        # log m = log(β p + (1 − β) q) in log space: exp of the two terms could underflow separately.
        log_m_B_T_N = torch.logaddexp(log_p_B_T_N + math.log(beta), log_q_B_T_N + math.log1p(-beta))
        jsd_B_T = beta * _bucket_kl(log_p_B_T_N, log_m_B_T_N) + (1.0 - beta) * _bucket_kl(
            log_q_B_T_N, log_m_B_T_N
        )
    return _masked(jsd_B_T, mask_B_T)


# ---------------------------------------------------------------------------------------------------------
# Black-box teacher: chunk rewards
# ---------------------------------------------------------------------------------------------------------


def chunk_weighted_nll(student_logprobs_B_T: Tensor, weights_B_T: Tensor, chunk_mask_B_T: Tensor) -> Tensor:
    """Per-token −w_t · log q(x_t) on the tokens of scored chunks (q = student, weights detached).

    w_t is the reward of the chunk holding token t (less a baseline), the same for all of its tokens: a
    chunk-level REINFORCE / reward-weighted likelihood. Logit-free on-policy distillation rewards a chunk
    by how often the teacher, continuing the same prefix, says something alike; there is no per-token
    teacher signal. Tokens outside chunks get 0 here (see `reverse_kl_to_reference`).
    """
    # The same estimator as the per-token policy gradient, with the chunk reward as the advantage.
    return policy_gradient_loss(student_logprobs_B_T, weights_B_T, chunk_mask_B_T)


def reverse_kl_to_reference(
    student_logprobs_B_T_V: Tensor, reference_logprobs_B_T_V: Tensor, mask_B_T: Tensor
) -> Tensor:
    """Per-token exact KL(q‖r) = Σ_v q_v (log q_v − log r_v) over the whole vocabulary.

    q = the student being trained, r = a frozen reference (the initial student): a trust region that keeps
    the tokens no teacher signal reaches from drifting. Gradient flows through q only.
    """
    valid_B_T = mask_B_T > 0
    dtype = _compute_dtype(student_logprobs_B_T_V)
    log_q_B_T_V = _clean(student_logprobs_B_T_V, valid_B_T[..., None], dtype)
    log_r_B_T_V = _clean(reference_logprobs_B_T_V.detach(), valid_B_T[..., None], dtype)
    return _masked(_bucket_kl(log_q_B_T_V, log_r_B_T_V), mask_B_T)


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def _compute_dtype(student: Tensor) -> torch.dtype:
    # bf16/fp16 logprobs (autocast) lose too much in exp/log and tail subtraction: compute in fp32 at least.
    return student.dtype if student.dtype in (torch.float32, torch.float64) else torch.float32


def _clean(logprobs: Tensor, valid: Tensor, dtype: torch.dtype) -> Tensor:
    """Padding → 0, then floor at e^-87 so a -inf at a real position cannot reach the arithmetic."""
    return torch.where(valid, logprobs.to(dtype), 0.0).clamp_min(TAIL_LOGPROB_FLOOR)


def _masked(per_token_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    mask_B_T = mask_B_T.to(per_token_B_T.dtype)
    return torch.where(mask_B_T > 0, per_token_B_T * mask_B_T, 0.0)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − e^x) for x ≤ 0, floored at TAIL_LOGPROB_FLOOR (x ≥ 0 from rounding gives the floor).

    Mächler (2012), "Accurately computing log(1 − exp(−|a|))": log(−expm1(x)) near 0, log1p(−exp(x)) below
    −ln 2. Each branch gets its input clamped into its own range, so the branch torch.where discards has
    a finite local gradient (an infinite one would turn the zero upstream gradient into nan).
    """
    near_zero = torch.log((-torch.expm1(x.clamp_min(-_LN2))).clamp_min(_TINY))
    far = torch.log1p(-torch.exp(x.clamp_max(-_LN2)))
    return torch.where(x > -_LN2, near_zero, far)


def _tail_logprob(top_logprobs_B_T_K: Tensor) -> Tensor:
    """log(1 − Σ_k e^{lp_k}): the log mass outside the K ids, never -inf or NaN."""
    return _log1mexp(top_logprobs_B_T_K.logsumexp(-1))


def _with_tail(top_B_T_K: Tensor, tail_B_T: Tensor) -> Tensor:
    return torch.cat([top_B_T_K, tail_B_T[..., None]], dim=-1)


def _teacher_buckets(
    top_logprobs_B_T_K: Tensor, tail_logprob_B_T: Tensor, valid_B_T: Tensor, dtype
) -> Tensor:
    """The teacher's K + 1 bucket logprobs as the service reports them (no gradient)."""
    log_p_top_B_T_K = _clean(top_logprobs_B_T_K.detach(), valid_B_T[..., None], dtype)
    log_p_tail_B_T = _clean(tail_logprob_B_T.detach(), valid_B_T, dtype)
    return _with_tail(log_p_top_B_T_K, log_p_tail_B_T)


def _student_buckets(logprobs_B_T_V: Tensor, ids_B_T_K: Tensor, valid_B_T: Tensor, dtype) -> Tensor:
    """The student's logprobs at the K ids plus its log tail mass 1 − Σ_k q_k."""
    # Garbage ids at padding (-1, ≥ V) would make gather fail; the service sends int32, gather needs int64.
    ids_B_T_K = ids_B_T_K.long().masked_fill(~valid_B_T[..., None], 0)
    log_q_top_B_T_K = _clean(logprobs_B_T_V.gather(-1, ids_B_T_K), valid_B_T[..., None], dtype)
    return _with_tail(log_q_top_B_T_K, _tail_logprob(log_q_top_B_T_K))


def _bucket_kl(log_a_B_T_N: Tensor, log_b_B_T_N: Tensor) -> Tensor:
    """KL(a‖b) = Σ_n a_n (log a_n − log b_n) over the last axis; inputs are finite (floored)."""
    return (log_a_B_T_N.exp() * (log_a_B_T_N - log_b_B_T_N)).sum(-1)
