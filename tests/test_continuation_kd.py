"""The black-box continuation KD term (signals/continuation_kd.py, losses.ragged_topk_forward_kl): the loss
against a hand computation, the text → id table, and how an API's tokens become training sequences."""

from __future__ import annotations

import math

import pytest
import torch

from opd_client import convert
from opd_client.schema import ChunkScore, ChunkScoreResponse, TeacherToken
from opd_student.losses import ragged_topk_forward_kl, topk_forward_kl
from opd_student.rollouts import Rollout
from opd_student.signals.continuation_kd import TokenTable, kd_sequences, kd_tensors
from opd_teacher.blackbox.chunk_scorer import continuation_tokens
from opd_teacher.blackbox.chunks import TeacherToken as ApiToken

B, T, V = 2, 3, 9
MASK_B_T = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def _logprobs(seed: int, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2, -1).to(dtype)


def _ragged_case():
    """Teacher alternatives of different counts per position: (ids, logprobs, present)."""
    teacher = _logprobs(1)
    counts = [[3, 1, 4], [2, 5, 0]]
    K = 5
    ids = torch.zeros((B, T, K), dtype=torch.long)
    lps = torch.full((B, T, K), 7.0, dtype=torch.float64)  # garbage where absent: must not reach the result
    present = torch.zeros((B, T, K), dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            n = counts[b][t]
            top_lp, top_ids = teacher[b, t].topk(n)
            ids[b, t, :n], lps[b, t, :n], present[b, t, :n] = top_ids, top_lp, True
    return ids, lps, present


def test_ragged_topk_forward_kl_matches_hand_computation():
    student = _logprobs(0)
    ids, lps, present = _ragged_case()
    loss = ragged_topk_forward_kl(student, ids, lps, present, MASK_B_T)
    for b in range(B):
        for t in range(T):
            if MASK_B_T[b, t] == 0:
                assert loss[b, t].item() == 0.0
                continue
            n = int(present[b, t].sum())
            p = [math.exp(x) for x in lps[b, t, :n].tolist()]
            q = [math.exp(student[b, t, int(i)].item()) for i in ids[b, t, :n]]
            p, q = [*p, 1 - sum(p)], [*q, 1 - sum(q)]
            want = sum(x * (math.log(x) - math.log(y)) for x, y in zip(p, q, strict=True) if x > 0)
            assert loss[b, t].item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_ragged_topk_forward_kl_equals_topk_forward_kl_when_all_present():
    student, teacher = _logprobs(2), _logprobs(3)
    top_lp, top_ids = teacher.topk(4, dim=-1)
    tail = torch.log1p(-top_lp.exp().sum(-1))
    want = topk_forward_kl(student, top_ids, top_lp, tail, MASK_B_T)
    got = ragged_topk_forward_kl(
        student, top_ids, top_lp, torch.ones_like(top_ids, dtype=torch.bool), MASK_B_T
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_ragged_topk_forward_kl_gradient_is_finite_and_matches_autograd_of_the_hand_formula():
    ids, lps, present = _ragged_case()
    logits = torch.randn(B, T, V, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    logits.requires_grad_()
    ragged_topk_forward_kl(torch.log_softmax(logits, -1), ids, lps, present, MASK_B_T).sum().backward()
    got = logits.grad.clone()
    logits.grad = None
    total = torch.zeros((), dtype=torch.float64)
    log_q = torch.log_softmax(logits, -1)
    for b in range(B):
        for t in range(T):
            if MASK_B_T[b, t] == 0:
                continue
            n = int(present[b, t].sum())
            lp, lq = lps[b, t, :n], log_q[b, t, ids[b, t, :n]]
            p_tail, q_tail = 1 - lp.exp().sum(), 1 - lq.exp().sum()
            total = total + (lp.exp() * (lp - lq)).sum()
            if n:
                total = total + p_tail * (torch.log(p_tail) - torch.log(q_tail))
    total.backward()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, logits.grad, rtol=1e-7, atol=1e-10)


class _Tokenizer:
    """A 6-id vocabulary: two ids share a text, one is half of a multi-byte character, one is special."""

    TEXTS = ["a", " b", "\ufffd", " b", "<|im_end|>", "cd"]

    def __len__(self) -> int:
        return len(self.TEXTS)

    def batch_decode(self, ids, skip_special_tokens=False):
        return [self.TEXTS[i[0]] for i in ids]


def test_token_table_maps_unique_texts_and_llama_cpps_empty_special_token():
    table = TokenTable(_Tokenizer(), eos_token_id=4)
    assert table.get("a") == 0 and table.get("cd") == 5 and table.get("<|im_end|>") == 4
    assert table.get(" b") is None  # two ids decode to it: ambiguous
    assert table.get("\ufffd") is None
    assert table.get("") == 4  # llama.cpp reports the end-of-turn token as ""
    assert table.get("zz") is None


def _tok(text: str, alternatives: dict[str, float]) -> TeacherToken:
    ranked = sorted(alternatives.items(), key=lambda kv: -kv[1])
    return TeacherToken(
        text=text,
        logprob=alternatives[text],
        top_tokens=[t for t, _ in ranked],
        top_logprobs=[x for _, x in ranked],
    )


def _response(chunks: list[tuple[int, list[TeacherToken] | None]]) -> ChunkScoreResponse:
    return ChunkScoreResponse.model_validate(
        {
            "model": "t",
            "chunks": [
                ChunkScore(
                    start=s, end=s + 1, text="", similarity=0, similarity_max=0, edit_similarity=0,
                    edit_similarity_max=0, matches=0, reward=0.5, accepted_tokens=0, token_logprobs=[None],
                    greedy="", teacher_tokens=tokens,
                ).model_dump()
                for s, tokens in chunks
            ],
            "usage": {},
        }
    )  # fmt: skip


def test_kd_sequences_start_at_the_student_prefix_and_stop_at_an_unmapped_token():
    table = TokenTable(_Tokenizer(), eos_token_id=4)
    rollout = Rollout(prompt_ids=[9, 9], completion_ids=[0, 5, 0, 4], teacher="t", prompt_id="p")
    tokens = [
        _tok("cd", {"cd": -0.1, "a": -2.5, " b": -3.0, "zz": -4.0}),  # " b" ambiguous, "zz" unknown: tail
        _tok("a", {"a": -0.3, "": -1.6}),  # "" is the end of turn
        _tok("zz", {"zz": -0.2, "a": -2.0}),  # unmapped: the continuation stops before it
        _tok("a", {"a": -0.1}),
    ]
    (seq,) = kd_sequences([rollout], [_response([(2, tokens), (3, None)])], table)
    assert seq.rollout.prompt_ids == [9, 9, 0, 5] and seq.rollout.completion_ids == [5, 0]
    assert seq.top_ids_T_K == [[5, 0], [0, 4]]
    assert seq.top_logprobs_T_K == [[-0.1, -2.5], [-0.3, -1.6]]
    ids, lps, present = kd_tensors([None, seq], horizon=3)
    assert present[0].sum() == 0 and present[1, 2].sum() == 0
    assert ids[1, 1].tolist() == [0, 4] and lps[1, 0].tolist() == pytest.approx([-0.1, -2.5])


def test_continuation_tokens_skip_the_repeated_prefix_only_on_a_token_boundary():
    toks = [ApiToken("The", -0.1, {"The": -0.1}), ApiToken(" sky", -0.2, {" sky": -0.2, " sea": -1.0})]
    assert [t.text for t in continuation_tokens(toks, 0)] == ["The", " sky"]
    (sky,) = continuation_tokens(toks, 3)
    assert sky.top_tokens == [" sky", " sea"] and sky.top_logprobs == [-0.2, -1.0]
    assert continuation_tokens(toks, 2) is None  # the cut falls inside "The"
    assert continuation_tokens(None, 0) is None


def test_teacher_tokens_cross_grpc_and_back():
    response = _response([(1, [_tok("a", {"a": -0.5, "cd": -1.5})]), (2, None)])
    response.chunks[0].token_logprobs = [None]
    back = convert.chunk_response_from_proto(convert.chunk_response_to_proto(response))
    assert back.chunks[0].teacher_tokens == response.chunks[0].teacher_tokens
    assert back.chunks[1].teacher_tokens is None
