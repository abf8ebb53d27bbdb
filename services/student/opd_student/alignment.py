"""Aligning two tokenizations of one text by their byte spans (cross-tokenizer distillation).

The student and the teacher cut the same completion text into tokens their own way. Each side's tokens
carry [start, end) byte spans that tile the text's UTF-8 (opd_client.token_bytes; the service's
/v1/score-text). An aligned span is a stretch of text where both sides have a token boundary at its start
and at its end and none in common inside: the shortest pieces over which the two sides' logprobs can be
compared, since log p(span text | text before it) is the sum of the logprobs of the tokens inside it on
either side (up to how each model would also spell that text with other tokens, which neither measures).

The walk follows TRL's GOLD trainer (trl/experimental/gold/gold_trainer.py, ULDLoss._align_by_byte_offsets):
advance the side whose current token ends first; where both end at the same byte, close the span. Two
choices differ and are documented here:
- a token with an empty span (a special token: the student's EOS, the teacher's end-of-turn) joins the
  span that follows it; empty tokens on both sides at the same place form an empty span of their own, so
  at the end of a finished answer the student's EOS and the teacher's end-of-turn form the final span
  [n, n) ("the answer ends here", scored on both sides);
- tokens left over on one side at the end (GOLD makes a span with nothing on the other side, then drops
  it) join the last span, so every token of both sides is in exactly one span and the teacher's
  logprobs over the spans sum to its logprob of the whole completion.

A character whose UTF-8 bytes are split over several tokens (byte-level BPE cuts a 4-byte emoji into 3
tokens) has a token boundary inside it on that side only, never on the other side's whole-character
token: its pieces always land in one span with that token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Span = tuple[int, int]


@dataclass(frozen=True)
class AlignedSpan:
    """Bytes [start, end) of the text, and the student's and teacher's token indices inside them."""

    start: int
    end: int
    student: range
    teacher: range


def check_tiling(spans: Sequence[Span] | Sequence[Sequence[int]], num_bytes: int, side: str) -> None:
    """Raise ValueError unless the spans tile [0, num_bytes) in order (empty spans allowed)."""
    cursor = 0
    for i, (start, end) in enumerate(spans):
        if start != cursor or end < start:
            raise ValueError(
                f"{side} token {i} spans bytes [{start}, {end}) but the previous token ended at {cursor}: "
                "spans must tile the text in order"
            )
        cursor = end
    if cursor != num_bytes:
        raise ValueError(f"{side} tokens cover bytes [0, {cursor}) of a {num_bytes}-byte text")


def align_spans(
    student: Sequence[Span] | Sequence[Sequence[int]],
    teacher: Sequence[Span] | Sequence[Sequence[int]],
    num_bytes: int,
) -> list[AlignedSpan]:
    """The aligned spans of two tilings of the same num_bytes-byte text, in order."""
    check_tiling(student, num_bytes, "student")
    check_tiling(teacher, num_bytes, "teacher")
    spans: list[AlignedSpan] = []
    s = t = s0 = t0 = 0
    start = 0
    while s < len(student) and t < len(teacher):
        s_end, t_end = student[s][1], teacher[t][1]
        if s_end < t_end:
            s += 1
        elif t_end < s_end:
            t += 1
        else:  # both sides have a boundary here: close the span
            s += 1
            t += 1
            spans.append(AlignedSpan(start, s_end, range(s0, s), range(t0, t)))
            s0, t0, start = s, t, s_end
    if s0 < len(student) or t0 < len(teacher):  # one side's leftover tokens (empty spans at the end)
        if spans:
            last = spans.pop()
            spans.append(AlignedSpan(last.start, num_bytes, range(last.student.start, len(student)),
                                     range(last.teacher.start, len(teacher))))  # fmt: skip
        else:
            spans.append(AlignedSpan(0, num_bytes, range(len(student)), range(len(teacher))))
    return spans


def span_of_token(spans: Sequence[AlignedSpan], num_tokens: int, side: str = "student") -> list[int]:
    """For each token of one side, the index of its aligned span."""
    index = [0] * num_tokens
    for g, span in enumerate(spans):
        for i in span.student if side == "student" else span.teacher:
            index[i] = g
    return index


def span_sums(values: Sequence[float], spans: Sequence[AlignedSpan], side: str) -> list[float]:
    """Σ of one side's per-token values (e.g. logprobs) over each aligned span."""
    return [
        float(sum(values[i] for i in (span.student if side == "student" else span.teacher))) for span in spans
    ]
