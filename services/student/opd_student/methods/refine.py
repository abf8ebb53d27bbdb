"""TRD, trajectory-refined distillation (Jiang et al. 2026, *Trajectory-Refined Distillation*, arXiv
2606.08432): "revises the student's rollout under the teacher guidance while within on-policy support. By
correcting problematic prefixes before distillation, TRD mitigates prefix failure at its source."

The paper's released code (github.com/louieworth/trd, recipe/opd/generation/y_r_prepare.py) has the teacher
rewrite the whole answer in a prompt that shows it the student's attempt, and trains the forward KL on the
rewrite (`forward_kl_y_r`). A 135M teacher cannot follow such a rewrite prompt, so we take the reading of
the issue that asked for it, which is ours: the rollout is cut at its first failing token and the teacher
continues from there,

    f = min { t : log p(x_t | x_<t) < τ }   (τ = trd_min_logprob; no such t: the rollout is kept as is)
    refined = x_<f  +  the teacher's own sampled continuation of (its prompt view, x_<f)

(`POST /inference/v1/generate`, seeded per rollout, at most horizon − f tokens). The student's prefix x_<f
keeps the on-policy OPD loss; the teacher's tokens, which the student did not sample, get the likelihood
term −log q(y_t) (the forward KL on teacher samples, as TRD trains y_r).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from opd_client.scores import SequenceScores
from opd_student.rollouts import Rollout


def first_failure(teacher_logprobs_T: np.ndarray, threshold: float) -> int | None:
    """The first completion index whose teacher logprob is below `threshold` (None: none is)."""
    below = np.flatnonzero(np.asarray(teacher_logprobs_T) < threshold)
    return int(below[0]) if len(below) else None


def teacher_view(rollout: Rollout, prefix_len: int) -> list[int]:
    """What the teacher continues: its prompt (the privileged one, if any) and the student's first tokens."""
    prompt = rollout.teacher_prefix_ids if rollout.teacher_prefix_ids is not None else rollout.prompt_ids
    return prompt + rollout.completion_ids[:prefix_len]


def refined(rollout: Rollout, cut: int, continuation: list[int]) -> Rollout:
    """The rollout with its tokens from `cut` on replaced by the teacher's continuation (teacher_from = cut)."""
    if not continuation:
        return rollout
    behaviour = rollout.behaviour_logprobs
    return dataclasses.replace(
        rollout,
        completion_ids=rollout.completion_ids[:cut] + continuation,
        teacher_from=cut,
        behaviour_logprobs=behaviour[:cut] + [0.0] * len(continuation) if behaviour is not None else None,
    )


def cuts(scores: list[SequenceScores], threshold: float) -> list[int | None]:
    """Each rollout's first failing index from the teacher's scores of its tokens."""
    out: list[int | None] = []
    for s in scores:
        assert s.token_logprobs_T is not None, "TRD's scoring asks top_k >= 1"
        out.append(first_failure(s.token_logprobs_T, threshold))
    return out
