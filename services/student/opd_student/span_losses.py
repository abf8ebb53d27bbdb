"""Cross-tokenizer losses over aligned spans (opd_student.alignment): pure functions of tensors.

p = the teacher, q = the student; B rollouts, T student completion positions, G aligned spans per rollout,
V the student's vocabulary, K the teacher's top-k. `span_B_T` holds each student token's aligned span;
`mask_B_T` is 1.0 on real completion tokens. Every loss returns a per-token [B, T] tensor, masked, that
the trainer sums and divides by the step's student tokens (losses.token_mean), as for the token losses.

The third term, on the teacher's top-k beside the sampled tokens, is losses.ragged_topk_forward_kl on
the top-k entries whose strings are student tokens; `uld_rest_l1` here is the ULD term for the rest.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd_student.losses import TAIL_LOGPROB_FLOOR


@torch.no_grad()
def span_reverse_kl_advantages(
    student_logprobs_B_T: Tensor, span_B_T: Tensor, teacher_span_logprobs_B_G: Tensor, mask_B_T: Tensor
) -> Tensor:
    """A_t = Σ_{u ∈ T_g} log p(u) − Σ_{s ∈ S_g} log q(x_s) for every student token t of aligned span g.

    The sampled reverse KL of the span's text, log p(text_g | text before) − log q(text_g | text before),
    estimated at the student's own sample: the cross-tokenizer counterpart of reverse_kl's per-token reward
    r_t = log p(x_t) − log q(x_t), which it equals when every span holds one token on each side. Each
    student token of the span gets the whole span's reward as its advantage (the policy gradient
    −A_t ∇log q(x_t), losses.policy_gradient_loss): the teacher's logprobs cannot be split at a student
    boundary the teacher does not have. No gradient.
    """
    valid_B_T = mask_B_T > 0
    log_q_B_T = torch.where(valid_B_T, student_logprobs_B_T.float(), 0.0).clamp_min(TAIL_LOGPROB_FLOOR)
    log_q_B_T = torch.where(valid_B_T, log_q_B_T, 0.0)
    index_B_T = torch.where(valid_B_T, span_B_T, 0).long()
    student_span_B_G = torch.zeros_like(teacher_span_logprobs_B_G, dtype=torch.float32)
    student_span_B_G = student_span_B_G.scatter_add(1, index_B_T, log_q_B_T)
    reward_B_G = teacher_span_logprobs_B_G.float() - student_span_B_G
    return torch.where(valid_B_T, reward_B_G.gather(1, index_B_T), 0.0)


def uld_rest_l1(
    student_logprobs_B_T_V: Tensor,
    teacher_logprobs_B_T_K: Tensor,
    student_ids_B_T_K: Tensor,
    matched_B_T_K: Tensor,
    mask_B_T: Tensor,
) -> Tensor:
    """ULD's sorted-probability distance on the part of the two distributions the top-k term leaves out.

    Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the
    Universal Logit Distillation Loss for LLMs", arXiv 2402.12030) compares two distributions over
    different vocabularies by their sorted probability vectors, Σ_i |p_(i) − q_(i)| (the Wasserstein-1
    distance under a cost of 1 between any two distinct tokens, padded with zeros). As in TRL's GOLD hybrid,
    only the rest is compared this way: the teacher's top-k entries whose strings are not student tokens
    (matched_B_T_K False, student_ids_B_T_K ignored there) against the student's probabilities outside the
    ids the matched entries name. The teacher's distribution beyond its top-k is unknown, so the ranks
    past the n unmatched entries merge into one bucket on each side:

        L = Σ_{i<n} |u_(i) − v_(i)| + |(p_R − Σ_{i<n} u_(i)) − (q_R − Σ_{i<n} v_(i))|

    u: the teacher's unmatched top-k probabilities sorted, v: the student's largest probabilities outside
    the matched ids, p_R = 1 − Σ_matched p, q_R = 1 − Σ_matched q. By the triangle inequality L is at
    most the full sorted-L1 on the rest. Gradient flows through q only.
    """
    valid_B_T = mask_B_T > 0
    V = student_logprobs_B_T_V.shape[-1]
    matched_B_T_K = matched_B_T_K.bool() & valid_B_T[..., None]
    p_B_T_K = teacher_logprobs_B_T_K.detach().float().exp() * valid_B_T[..., None]
    q_B_T_V = student_logprobs_B_T_V.float().exp()
    # The student's probabilities with the matched ids zeroed (one spare column takes the unmatched rows).
    ids_B_T_K = torch.where(matched_B_T_K, student_ids_B_T_K.long(), V)
    q_ext_B_T_W = torch.cat([q_B_T_V, q_B_T_V.new_zeros(q_B_T_V.shape[:-1] + (1,))], dim=-1)
    q_matched_B_T = (q_ext_B_T_W.gather(-1, ids_B_T_K) * matched_B_T_K).sum(-1)
    q_rest_B_T_V = q_ext_B_T_W.scatter(-1, ids_B_T_K, 0.0)[..., :V]
    K = p_B_T_K.shape[-1]
    u_B_T_K = torch.where(matched_B_T_K, 0.0, p_B_T_K).sort(dim=-1, descending=True).values
    v_B_T_K = q_rest_B_T_V.topk(K, dim=-1).values
    n_B_T = (~matched_B_T_K).sum(-1) * valid_B_T
    ranked_B_T_K = torch.arange(K, device=u_B_T_K.device) < n_B_T[..., None]
    head_B_T = ((u_B_T_K - v_B_T_K).abs() * ranked_B_T_K).sum(-1)
    p_rest_B_T = (1.0 - (p_B_T_K * matched_B_T_K).sum(-1)).clamp_min(0.0)
    q_rest_B_T = (1.0 - q_matched_B_T).clamp_min(0.0)
    bucket_B_T = (
        (p_rest_B_T - (u_B_T_K * ranked_B_T_K).sum(-1)) - (q_rest_B_T - (v_B_T_K * ranked_B_T_K).sum(-1))
    ).abs()
    per_token_B_T = head_B_T + bucket_B_T
    return torch.where(valid_B_T, per_token_B_T * mask_B_T, 0.0)
