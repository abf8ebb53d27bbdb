"""OPCoD's cognizance gating, as we read it: a peer teacher gives feedback only where it is confident.

Byeon et al. 2026, *Be My Tutor: On-Policy Co-Distillation for Mutual LLM Improvement via Peer Feedback*
(OPCoD, arXiv 2606.14368): two models, each stronger in one domain, tutor each other, and "cognizance-based
gating" decides when a peer gives feedback. Their gate is defined on their Science Q&A setting; ours is a
per-token reading of it on the teacher's own scores, which is ours and not the paper's formula:

    entropy:  w_t = 1[H_t ≤ τ],   H_t = −Σ_k p_k log p_k − p_tail log p_tail   (top-k + one tail bucket)
    margin:   w_t = 1[p_(1) − p_(2) ≥ τ]                                      (the two most likely tokens)

H_t over the top-k and one tail bucket is a lower bound of the teacher's entropy (the tail's mass counted
as one token); with top_k = 20 the default teacher's tail holds little mass where it is confident, which is
where the gate keeps tokens. A peer that is unsure of a token (its weaker domain) then gives no feedback
there, and the student keeps what it knows. τ = `cognizance_threshold`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd_client.scores import SequenceScores


def teacher_entropy(scores: SequenceScores) -> Tensor:
    """H_T of the teacher's top-k + tail distribution, nats [T]."""
    assert scores.top_logprobs_T_K is not None and scores.tail_logprob_T is not None, "top_k >= 1"
    logprobs_T_K1 = torch.cat(
        [torch.from_numpy(scores.top_logprobs_T_K), torch.from_numpy(scores.tail_logprob_T)[:, None]], dim=1
    ).double()
    return -(logprobs_T_K1.exp() * logprobs_T_K1).sum(-1).float()


def teacher_margin(scores: SequenceScores) -> Tensor:
    """p_(1) − p_(2) of the teacher at each position [T] (its two most likely tokens; needs top_k ≥ 2)."""
    assert scores.top_logprobs_T_K is not None and scores.top_logprobs_T_K.shape[1] >= 2, "top_k >= 2"
    top_T_K = torch.from_numpy(scores.top_logprobs_T_K[:, :2]).double().exp()
    return (top_T_K[:, 0] - top_T_K[:, 1]).float()


def cognizance_keep(scores: SequenceScores, gate: str, threshold: float) -> Tensor:
    """w_T: 1.0 where the teacher is confident by `gate` ("entropy" or "margin")."""
    if gate == "entropy":
        return (teacher_entropy(scores) <= threshold).float()
    if gate == "margin":
        return (teacher_margin(scores) >= threshold).float()
    raise ValueError(f"cognizance_gate must be entropy or margin; got {gate!r}")
