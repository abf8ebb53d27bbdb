"""A teacher with another tokenizer: the student's rollouts as text requests (POST /v1/score-text), and the
teacher's answers aligned with the student's tokens (opd_student.alignment) into per-token arrays.

The completion text is what the student's sampled ids spell (opd_client.token_bytes.ids_text: special
tokens add nothing, bytes that are not UTF-8 become U+FFFD), so both sides' byte spans index the same
bytes. A completion that ends with the student's EOS asks the teacher to score its own end-of-turn token
too (completion_ends): the two form the final aligned span, "the answer ends here". Used by training
(signals/cross_tokenizer.py) and by the held-out evaluation (text_evaluation.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from opd_client.schema import ChatMessage, ScoreTextRequest, TextSequence, TextSequenceScores
from opd_client.token_bytes import VocabBytes, ids_text
from opd_student.alignment import align_spans, span_of_token, span_sums
from opd_student.rollouts import Rollout


@dataclass(frozen=True)
class StudentText:
    text: str
    spans: list[tuple[int, int]]  # per student completion token, its [start, end) bytes in text
    ends: bool  # the completion ended with the student's EOS (or spells nothing): the teacher ends its turn


def student_text(rollout: Rollout, vocab: VocabBytes, eos_token_id: int) -> StudentText:
    text, spans = ids_text(rollout.completion_ids, vocab)
    ends = bool(rollout.completion_ids) and rollout.completion_ids[-1] == eos_token_id
    return StudentText(text, spans, ends or not text)  # an empty text: the teacher needs a token to score


def text_request(rollout: Rollout, text: StudentText, top_k: int) -> ScoreTextRequest:
    """The teacher's view of one rollout: its prompt (plain text, else the chat) and the completion text."""
    if rollout.teacher_text is not None:
        sequence = TextSequence(prompt=rollout.teacher_text, completion=text.text, completion_ends=text.ends)
    else:
        assert rollout.teacher_chat is not None, "the rollout factory gives every rollout its teacher's chat"
        messages = [ChatMessage(role=m["role"], content=m["content"]) for m in rollout.teacher_chat]
        sequence = TextSequence(messages=messages, completion=text.text, completion_ends=text.ends)
    return ScoreTextRequest(model=rollout.teacher, sequences=[sequence], top_k=top_k)


@dataclass
class AlignedRollout:
    """One rollout's teacher signal on the student's tokens (T of them, G aligned spans)."""

    span_T: np.ndarray  # int64 [T]: each student token's aligned span
    teacher_span_logprob_G: np.ndarray  # float32 [G]: Σ of the teacher's logprobs over the span
    opens_T: np.ndarray  # bool [T]: the student token that opens its span (its prefix is the span's)
    top_ids_T_K: np.ndarray | None  # int64 [T, K]: student ids of the teacher's top-k strings where a span
    top_logprobs_T_K: np.ndarray | None  # opens (its first teacher token's top-k); -1: no student token
    num_bytes: int
    teacher_logprob: float  # Σ of all the teacher's token logprobs (= Σ over the spans)
    teacher_tokens: int

    @property
    def num_spans(self) -> int:
        return int(self.teacher_span_logprob_G.shape[0])


def student_ids_by_text(vocab: VocabBytes) -> dict[str, int]:
    """The student's token for each string a teacher's top-k may name (the lowest id where two spell the same;
    special tokens and pieces of a character are never matched)."""
    out: dict[str, int] = {}
    for i, text in enumerate(vocab.text_V):
        if text and i not in vocab.special_ids and "\ufffd" not in text:
            out.setdefault(text, i)
    return out


def align_rollout(
    text: StudentText,
    answer: TextSequenceScores,
    by_text: dict[str, int] | None = None,
    eos_token_id: int | None = None,
) -> AlignedRollout:
    """Align the teacher's tokens of the completion with the student's. With `by_text` (and an answer with
    top-k) the teacher's top-k at each span opening is mapped to student ids; the teacher's end-of-turn
    token maps to the student's EOS (both mean "the answer ends here")."""
    num_bytes = len(text.text.encode())
    if answer.completion_bytes != num_bytes:
        raise ValueError(
            f"the teacher scored {answer.completion_bytes} bytes of a {num_bytes}-byte completion"
        )
    teacher_spans = [(int(a), int(b)) for a, b in answer.byte_spans]
    spans = align_spans(text.spans, teacher_spans, num_bytes)
    T = len(text.spans)
    opens_T = np.zeros(T, dtype=bool)
    opens_T[[s.student.start for s in spans]] = True
    top_ids = top_lp = None
    if by_text is not None and answer.top_tokens is not None and answer.top_logprobs is not None:
        mapping = dict(by_text)
        if text.ends and eos_token_id is not None:  # the teacher's end-of-turn token, scored last
            mapping[answer.tokens[-1]] = eos_token_id
        K = len(answer.top_tokens[0])
        top_ids = np.full((T, K), -1, dtype=np.int64)
        top_lp = np.zeros((T, K), dtype=np.float32)
        for span in spans:
            row, t = span.teacher.start, span.student.start
            seen: set[int] = set()
            for k, string in enumerate(answer.top_tokens[row]):
                sid = mapping.get(string, -1)
                if sid >= 0 and sid not in seen:  # one bucket per student id
                    top_ids[t, k] = sid
                    seen.add(sid)
            top_lp[t] = answer.top_logprobs[row]
    return AlignedRollout(
        span_T=np.asarray(span_of_token(spans, T), dtype=np.int64),
        teacher_span_logprob_G=np.asarray(
            span_sums(answer.token_logprobs, spans, "teacher"), dtype=np.float32
        ),
        opens_T=opens_T,
        top_ids_T_K=top_ids,
        top_logprobs_T_K=top_lp,
        num_bytes=num_bytes,
        teacher_logprob=float(np.sum(answer.token_logprobs, dtype=np.float64)),
        teacher_tokens=len(answer.token_ids),
    )


@dataclass
class AlignedTensors:
    """A micro-batch's AlignedRollouts padded to [B, T] (and [B, G], [B, T, K]); zeros at padding."""

    span_B_T: torch.Tensor
    teacher_span_logprob_B_G: torch.Tensor
    opens_B_T: torch.Tensor  # float 1.0 where a span opens
    top_ids_B_T_K: torch.Tensor | None
    top_logprobs_B_T_K: torch.Tensor | None
    matched_B_T_K: torch.Tensor | None  # the teacher's top-k entry names a student token


def aligned_tensors(rows: list[AlignedRollout], horizon: int) -> AlignedTensors:
    B, G = len(rows), max(r.num_spans for r in rows)
    span = torch.zeros((B, horizon), dtype=torch.long)
    teacher = torch.zeros((B, G))
    opens = torch.zeros((B, horizon))
    with_top = rows[0].top_ids_T_K is not None
    K = rows[0].top_ids_T_K.shape[1] if rows[0].top_ids_T_K is not None else 0
    ids = torch.full((B, horizon, K), -1, dtype=torch.long) if with_top else None
    lp = torch.zeros((B, horizon, K)) if with_top else None
    for b, r in enumerate(rows):
        T = len(r.span_T)
        span[b, :T] = torch.from_numpy(r.span_T)
        teacher[b, : r.num_spans] = torch.from_numpy(r.teacher_span_logprob_G)
        opens[b, :T] = torch.from_numpy(r.opens_T.astype(np.float32))
        if ids is not None and lp is not None:
            assert r.top_ids_T_K is not None and r.top_logprobs_T_K is not None, (
                "every row asked the same top_k"
            )
            ids[b, :T] = torch.from_numpy(r.top_ids_T_K)
            lp[b, :T] = torch.from_numpy(r.top_logprobs_T_K)
    matched = ids >= 0 if ids is not None else None
    return AlignedTensors(span, teacher, opens, ids.clamp_min(0) if ids is not None else None, lp, matched)
