"""CR-OPD, counterfactual routed OPD: where the student's sampled token is one the teacher rejects, route
the update to the alternatives the student could have sampled instead and the teacher supports.

No paper text named "CR-OPD" could be found; this is our reading of the method as the issue describes it
("move probability mass toward teacher-supported alternatives that the student can still reach, using the
student's top-k scored by the teacher"):

- reachable alternatives: the student's own top-k ids K_t at position t (`cr_top_k`), whose teacher
  logprobs the service returns for the named ids (`score_ids`, as `student_topk_reverse_kl` asks them);
- teacher support on them: π̃_t(v) = p_t(v) / Σ_{u ∈ K_t} p_t(u), the teacher renormalised on K_t;
- routing: the counterfactual term applies where the sampled token's reward r_t = log p(x_t) − log q(x_t)
  is below τ (`cr_threshold`, default 0: the student rates the token higher than the teacher does);
- the term: c_t = 1[r_t < τ] · Σ_{v ∈ K_t} π̃_t(v) (log π̃_t(v) − log q_t(v)), the cross-entropy from the
  renormalised teacher to the student (less π̃'s entropy, a constant), gradient −Σ_v π̃_t(v) ∇log q_t(v):
  mass moves toward the teacher-supported reachable ids, in proportion to the teacher's preference.

The loss is OPD's sampled-token term plus η · c_t (`cr_coef`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd_student.losses import TAIL_LOGPROB_FLOOR


def routed_term(
    student_logprobs_B_T_V: Tensor,
    student_top_ids_B_T_K: Tensor,
    teacher_logprobs_at_ids_B_T_K: Tensor,
    rewards_B_T: Tensor,
    mask_B_T: Tensor,
    threshold: float,
) -> Tensor:
    """c_t [B, T] (module docstring), gradient through q; 0 at padding and where r_t ≥ τ."""
    valid_B_T = mask_B_T > 0
    routed_B_T = valid_B_T & (rewards_B_T.detach() < threshold)
    ids_B_T_K = student_top_ids_B_T_K.long().masked_fill(~valid_B_T[..., None], 0)
    log_q_B_T_K = student_logprobs_B_T_V.float().gather(-1, ids_B_T_K).clamp_min(TAIL_LOGPROB_FLOOR)
    log_p_B_T_K = torch.where(
        valid_B_T[..., None], teacher_logprobs_at_ids_B_T_K.detach().float(), 0.0
    ).clamp_min(TAIL_LOGPROB_FLOOR)
    log_pi_B_T_K = torch.log_softmax(log_p_B_T_K, dim=-1)
    term_B_T = (log_pi_B_T_K.exp() * (log_pi_B_T_K - log_q_B_T_K)).sum(-1)
    return torch.where(routed_B_T, term_B_T, 0.0)
