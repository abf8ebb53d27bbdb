"""Lookahead Group Reward (LGR) against supervision-fidelity decay, as we read Liu et al. 2026, *Your Teacher
Can't Help You Here: Combating Supervision Fidelity Decay in On-Policy Distillation* (arXiv 2605.30833;
its abstract could be read, not its method section).

The paper: "as student-generated prefixes lengthen, the teacher's next-token distribution becomes less
confident and less discriminative" (SFD); LGR "evaluates the student's top-K candidate tokens by the teacher
confidence they induce at the subsequent step and assigns a group-normalized reward", at positions chosen
by an "entropy-triggered" mechanism. Our reading, per rollout:

- trigger: the M completion positions t where the student's entropy H(q_t) is largest
  (`lookahead_positions`; ties go to the earlier position);
- candidates: the student's top-K ids c_1..c_K at t (`lookahead_candidates`);
- confidence: conf_k = max_v p(v | s_t, c_k), the teacher's top-1 probability at the step after c_k (one
  extra scored position per candidate: the sequence prompt + x_<t + c_k + a placeholder);
- group-normalised reward: R_k = (conf_k − mean_j conf_j) / (std_j conf_j + 1e-6) (population std);
- loss term at t: g_t = −Σ_k R_k log q(c_k | s_t) (Σ_k R_k = 0: mass moves among the candidates toward
  those that keep the teacher confident), added to OPD's sampled-token loss with weight `lookahead_coef`.

The paper's entropy-triggered tree attention is an efficiency device for its serving stack; here each
candidate is one more sequence in the step's scoring request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from opd_client.scores import SequenceScores
from opd_student.losses import TAIL_LOGPROB_FLOOR
from opd_student.rollouts import Rollout


@dataclass
class LookaheadPoints:
    """Where one rollout is looked ahead: positions [M] and the student's candidates there [M][K]."""

    positions: list[int]
    candidates: list[list[int]]


def top_entropy_positions(entropy_T: Tensor, count: int) -> list[int]:
    """The `count` positions of largest entropy (ties: the earlier), in increasing order."""
    count = min(count, len(entropy_T))
    if count <= 0:
        return []
    order = sorted(range(len(entropy_T)), key=lambda t: (-float(entropy_T[t]), t))
    return sorted(order[:count])


def group_rewards(confidence_K: Tensor) -> Tensor:
    """R_k = (c_k − mean c) / (std c + 1e-6), std the population one (all zeros when all are equal)."""
    c_K = confidence_K.float()
    return (c_K - c_K.mean()) / (c_K.std(unbiased=False) + 1e-6)


def lookahead_rollouts(
    rollouts: list[Rollout], points_N: list[LookaheadPoints], placeholder: int
) -> list[Rollout]:
    """One scoring sequence per (rollout, position, candidate), in that order: the teacher's view of
    prompt + x_<t + c_k, then one placeholder token whose scored distribution is p(· | s_t, c_k)."""
    out = []
    for r, points in zip(rollouts, points_N, strict=True):
        for t, candidates in zip(points.positions, points.candidates, strict=True):
            for c in candidates:
                prefix = r.completion_ids[:t] + [c]
                teacher_prefix = r.teacher_prefix_ids + prefix if r.teacher_prefix_ids is not None else None
                out.append(
                    Rollout(r.prompt_ids + prefix, [placeholder], teacher_prefix, r.teacher, r.prompt_id)
                )
    return out


def confidences(answers: list[SequenceScores]) -> Tensor:
    """conf = exp(top-1 logprob) of each lookahead answer's one scored position."""
    values = []
    for s in answers:
        assert s.top_logprobs_T_K is not None, "lookahead scores are asked with top_k >= 1"
        values.append(float(np.exp(s.top_logprobs_T_K[0, 0])))
    return torch.tensor(values, dtype=torch.float32)


def dense_targets(
    points_B: list[LookaheadPoints], rewards_B: list[Tensor], horizon: int, k: int
) -> tuple[Tensor, Tensor]:
    """(candidate ids [B, T, K], rewards [B, T, K]) with zeros where a row has no lookahead."""
    ids_B_T_K = torch.zeros((len(points_B), horizon, k), dtype=torch.long)
    rewards_B_T_K = torch.zeros((len(points_B), horizon, k))
    for b, (points, rewards_M_K) in enumerate(zip(points_B, rewards_B, strict=True)):
        for m, (t, candidates) in enumerate(zip(points.positions, points.candidates, strict=True)):
            ids_B_T_K[b, t, : len(candidates)] = torch.tensor(candidates)
            rewards_B_T_K[b, t, : len(candidates)] = rewards_M_K[m, : len(candidates)]
    return ids_B_T_K, rewards_B_T_K


def lookahead_term(
    student_logprobs_B_T_V: Tensor, candidate_ids_B_T_K: Tensor, rewards_B_T_K: Tensor, mask_B_T: Tensor
) -> Tensor:
    """g_t = −Σ_k R_k log q(c_k | s_t) [B, T], gradient through q; 0 at padding and untriggered positions."""
    valid_B_T = mask_B_T > 0
    ids_B_T_K = candidate_ids_B_T_K.long().masked_fill(~valid_B_T[..., None], 0)
    log_q_B_T_K = student_logprobs_B_T_V.float().gather(-1, ids_B_T_K).clamp_min(TAIL_LOGPROB_FLOOR)
    rewards_B_T_K = torch.where(valid_B_T[..., None], rewards_B_T_K.detach().float(), 0.0)
    return torch.where(valid_B_T, -(rewards_B_T_K * log_q_B_T_K).sum(-1), 0.0)
