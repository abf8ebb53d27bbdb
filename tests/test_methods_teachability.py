"""TA-OPD: teachability against a direct computation, and the exact top-fraction selection."""

from __future__ import annotations

import math

import pytest
import torch

from opd_student.methods.teachability import teachability, top_fraction

# Vocabulary of 6 ids. Position 0: the teacher's mass sits on ids the student gives almost nothing
# (large KL, incompatible). Position 1: the teacher reorders the student's own top-2 (smaller KL, learnable).
STUDENT_P = [
    [0.50, 0.40, 0.04, 0.03, 0.02, 0.01],
    [0.46, 0.44, 0.04, 0.03, 0.02, 0.01],
    [0.86, 0.05, 0.04, 0.03, 0.015, 0.005],
]
TEACHER_IDS = [[4, 5], [1, 0], [0, 3]]
TEACHER_P = [[0.60, 0.30], [0.80, 0.15], [0.70, 0.20]]


def direct_teachability(student_top_k: int) -> list[float]:
    """d_t · c_t written out with plain floats (no torch, no shared code with the implementation)."""
    out = []
    for q, ids, p in zip(STUDENT_P, TEACHER_IDS, TEACHER_P, strict=True):
        p_tail = 1 - sum(p)
        q_tail = 1 - sum(q[i] for i in ids)
        kl = sum(pk * math.log(pk / q[i]) for pk, i in zip(p, ids, strict=True))
        kl += p_tail * math.log(p_tail / q_tail)
        student_top = sorted(range(len(q)), key=lambda v: -q[v])[:student_top_k]
        compat = sum(pk for pk, i in zip(p, ids, strict=True) if i in student_top)
        out.append(kl * compat)
    return out


def tensors():
    log_q = torch.tensor(STUDENT_P).log()[None]  # [1, 3, 6]
    ids = torch.tensor(TEACHER_IDS)[None]
    log_p = torch.tensor(TEACHER_P).log()[None]
    tail = torch.log1p(-torch.tensor(TEACHER_P).sum(-1))[None]
    return log_q, ids, log_p, tail


@pytest.mark.parametrize("student_top_k", [1, 2, 3])
def test_teachability_matches_direct_computation(student_top_k):
    log_q, ids, log_p, tail = tensors()
    got = teachability(log_q, ids, log_p, tail, torch.ones(1, 3), student_top_k)[0].tolist()
    assert got == pytest.approx(direct_teachability(student_top_k), rel=1e-5, abs=1e-7)


def test_learnable_disagreement_outranks_a_larger_incompatible_one():
    log_q, ids, log_p, tail = tensors()
    tau = teachability(log_q, ids, log_p, tail, torch.ones(1, 3), 2)[0]
    kl = [
        sum(p * math.log(p / STUDENT_P[t][i]) for p, i in zip(TEACHER_P[t], TEACHER_IDS[t], strict=True))
        for t in (0, 1)
    ]
    assert kl[0] > kl[1]  # raw disagreement prefers position 0 ...
    assert tau[0] == 0.0 and tau[1] > 0  # ... teachability prefers position 1 (mass on the student's top-2)


def test_padding_gives_zero_even_with_garbage():
    log_q, ids, log_p, tail = tensors()
    log_p[0, 2] = float("nan")
    ids[0, 2] = -1
    tau = teachability(log_q, ids, log_p, tail, torch.tensor([[1.0, 1.0, 0.0]]), 2)
    assert tau[0, 2] == 0.0 and torch.isfinite(tau).all()


def test_top_five_percent_are_exactly_the_largest():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(40, generator=generator)  # distinct values
    eligible = torch.ones(40, dtype=torch.bool)
    chosen = top_fraction(scores, eligible, 0.05)  # ⌈0.05 · 40⌉ = 2
    expected = set(sorted(range(40), key=lambda i: -float(scores[i]))[:2])
    assert set(torch.nonzero(chosen).flatten().tolist()) == expected


def test_selection_is_among_eligible_tokens_only():
    scores = torch.tensor([9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0, 0.0])
    eligible = torch.tensor([False, True, True, True, True, True, True, True, True, True])
    # 9 eligible, 30% → ⌈2.7⌉ = 3: the best eligible are 8 (index 2), 7 (4), 6 (6); 9 (index 0) is not eligible.
    assert torch.nonzero(top_fraction(scores, eligible, 0.3)).flatten().tolist() == [2, 4, 6]
    assert top_fraction(scores, eligible, 1.0).tolist() == eligible.tolist()
    assert top_fraction(scores, torch.zeros(10, dtype=torch.bool), 0.05).sum() == 0


def test_ties_go_to_the_earlier_token_and_at_least_one_is_kept():
    scores = torch.tensor([1.0, 5.0, 5.0, 5.0, 0.0])
    chosen = top_fraction(scores, torch.ones(5, dtype=torch.bool), 0.4)  # ⌈2⌉ = 2 of the three 5s
    assert torch.nonzero(chosen).flatten().tolist() == [1, 2]
    assert top_fraction(scores, torch.ones(5, dtype=torch.bool), 0.01).sum() == 1
