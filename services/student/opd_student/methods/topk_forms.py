"""The stop-gradient variants of the student-top-k reverse KL, after the comprehensive study of OPD's
failure modes (*The Many Faces of On-Policy Distillation: Pitfalls, Mechanisms, and Fixes*, arXiv
2605.11182; its abstract and summaries could be read, not its equations): the TopK reverse-KL gradient "is
biased", which "stop-gradient TopK objectives" fix. Our reading, with K the student's top-k ids at t:

- `tail` (the default, losses.student_topk_reverse_kl): K buckets + one tail bucket, q_tail = 1 − Σ_K q_k.
  Its gradient Σ_n (log q_n − log p_n + 1) ∇q_n has Σ_n ∇q_n = ∇1 = 0 over the K + 1 buckets, so it is the
  exact score-function gradient of the bucket KL;
- `truncated`: L_t = Σ_{k∈K} q_k (log q_k − log p_k), the top-k sum without a tail, as many trainers write it;
  its gradient carries + Σ_K ∇q_k = ∇(top-k mass), which pushes mass out of the student's top-k whatever
  the teacher says: the bias;
- `truncated_sg`: L_t = Σ_{k∈K} q_k · sg(log q_k − log p_k), the same value with the log ratio detached,
  gradient Σ_K (log q_k − log p_k) ∇q_k: the truncated objective without the bias term.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd_student.losses import TAIL_LOGPROB_FLOOR


def truncated_topk_reverse_kl(
    student_logprobs_B_T_V: Tensor,
    student_top_ids_B_T_K: Tensor,
    teacher_score_logprobs_B_T_K: Tensor,
    mask_B_T: Tensor,
    stop_gradient: bool,
) -> Tensor:
    """Σ_{k∈K} q_k (log q_k − log p_k) per position [B, T] (no tail bucket); stop_gradient detaches the log
    ratio. 0 at padding."""
    valid_B_T = mask_B_T > 0
    ids_B_T_K = student_top_ids_B_T_K.long().masked_fill(~valid_B_T[..., None], 0)
    log_q_B_T_K = student_logprobs_B_T_V.float().gather(-1, ids_B_T_K).clamp_min(TAIL_LOGPROB_FLOOR)
    log_p_B_T_K = torch.where(
        valid_B_T[..., None], teacher_score_logprobs_B_T_K.detach().float(), 0.0
    ).clamp_min(TAIL_LOGPROB_FLOOR)
    log_ratio_B_T_K = log_q_B_T_K - log_p_B_T_K
    if stop_gradient:
        log_ratio_B_T_K = log_ratio_B_T_K.detach()
    return torch.where(valid_B_T, (log_q_B_T_K.exp() * log_ratio_B_T_K).sum(-1), 0.0)
