"""EDGE-OPD's evidence mask, as we read it: distil only where the privileged context supports the token.

Lazaridis et al. 2026, *EDGE-OPD: Internalizing Privileged Context with Evidence Guided On-Policy
Distillation* (arXiv 2605.23493). The paper (abstract and method summary) states that the student "is
updated only at token positions where the privileged context supports the sampled token, rather than on
every token in the rollout", and that the persona signal sits in "the positive-evidence tail". Our reading
of that, which is ours and not the paper's formula:

    e_t = log p_T(x_t | c_priv, x_<t) − log p_T(x_t | c_plain, x_<t)      (the evidence of token t)
    w_t = 1[e_t > τ]                                                       (τ = evidence_threshold)

p_T is the teacher (for self-distillation: the student's own weights), c_priv the prompt's
teacher_messages, c_plain the student's own prompt, x_t the sampled token; both logprobs come from the
same teacher service, so e_t measures what the privileged context alone changes. A rollout without
teacher_messages has no evidence and keeps all its tokens (as a rollout no token-mask rule applies to).
The paper's other half, guided rollouts (privileged context in some of the *student's* prompts at
sampling time), is not implemented here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from opd_client.scores import SequenceScores
from opd_student.rollouts import Rollout
from opd_student.teacher_link import Pending, TeacherLink


@dataclass
class EvidenceRequest:
    """The teacher's scores of the step's privileged rollouts after the student's own prompt instead."""

    idx: list[int]  # which of the step's rollouts had a privileged prefix
    pending: Pending


def request_plain_scores(link: TeacherLink, rollouts: list[Rollout]) -> EvidenceRequest | None:
    """Send the privileged rollouts again without their privileged prefix (None: the step has none)."""
    idx = [i for i, r in enumerate(rollouts) if r.teacher_prefix_ids is not None]
    if not idx:
        return None
    plain = [dataclasses.replace(rollouts[i], teacher_prefix_ids=None) for i in idx]
    return EvidenceRequest(idx, link.submit(plain, top_k=1))  # only the sampled token's logprob is used


def evidence_per_rollout(
    request: EvidenceRequest, plain: list[SequenceScores], scores: list[SequenceScores]
) -> list[Tensor | None]:
    """e_T per rollout of the step (None where there was no privileged context): `scores` are the step's
    own (privileged) answers, `plain` the answers to `request`."""
    evidence_N_T: list[Tensor | None] = [None] * len(scores)
    for i, plain_scores in zip(request.idx, plain, strict=True):
        evidence_N_T[i] = evidence(scores[i], plain_scores)
    return evidence_N_T


def evidence(privileged: SequenceScores, plain: SequenceScores) -> Tensor:
    """e_T = log p(x_t | privileged context) − log p(x_t | the student's prompt), float32 [T]."""
    assert privileged.token_logprobs_T is not None and plain.token_logprobs_T is not None, "top_k >= 1"
    return torch.from_numpy(privileged.token_logprobs_T - plain.token_logprobs_T).float()


def evidence_keep(evidence_T: Tensor, threshold: float) -> Tensor:
    """w_T: 1.0 where the privileged context raised the token's logprob by more than `threshold` nats."""
    return (evidence_T > threshold).float()
