"""Aligning two tokenizations of one text by byte spans (opd_student.alignment), on hand-made cases and
on real tokenizers: SmolLM2's byte-level BPE (the student's) against Gemma 3's SentencePiece style."""

from __future__ import annotations

import math
import random

import pytest

from opd_client.token_bytes import ids_text, text_byte_spans, vocab_bytes
from opd_student.alignment import AlignedSpan, align_spans, check_tiling, span_of_token, span_sums


def tiling(pieces: list[bytes]) -> list[tuple[int, int]]:
    spans, start = [], 0
    for p in pieces:
        spans.append((start, start + len(p)))
        start += len(p)
    return spans


def assert_partition(spans: list[AlignedSpan], n_student: int, n_teacher: int, num_bytes: int) -> None:
    """Aligned spans tile the text exactly once; every token of each side is in exactly one span, in order."""
    assert [s.start for s in spans] == [0] + [s.end for s in spans[:-1]] and spans[-1].end == num_bytes
    assert [i for s in spans for i in s.student] == list(range(n_student))
    assert [i for s in spans for i in s.teacher] == list(range(n_teacher))
    assert all(len(s.student) and len(s.teacher) for s in spans)


def test_a_word_as_one_token_against_three():
    text = "tokenization is"
    student = tiling([b"tokenization", b" is"])
    teacher = tiling([b"token", b"iz", b"ation", b" is"])
    spans = align_spans(student, teacher, len(text))
    assert spans == [
        AlignedSpan(0, 12, range(0, 1), range(0, 3)),
        AlignedSpan(12, 15, range(1, 2), range(3, 4)),
    ]
    # the teacher's three logprobs add up in the word's span: log p("tokenization" | prefix)
    teacher_lp = [-1.0, -0.5, -0.25, -2.0]
    assert span_sums(teacher_lp, spans, "teacher") == [-1.75, -2.0]


def test_a_leading_space_as_its_own_token_against_one_merged_with_the_word():
    # byte-level BPE: " Hello" is one token; a SentencePiece-style tokenizer may give " " then "Hello"
    text = " Hello world"
    student = tiling([b" Hello", b" world"])
    teacher = tiling([b" ", b"Hello", b" world"])
    spans = align_spans(student, teacher, len(text))
    assert [(s.start, s.end, list(s.student), list(s.teacher)) for s in spans] == [
        (0, 6, [0], [0, 1]),
        (6, 12, [1], [2]),
    ]


def test_a_multi_byte_character_split_over_byte_tokens_stays_in_one_span():
    text = " 😀 ok"  # the emoji is 4 bytes: byte-level BPE gives " " + 3 of its bytes, then the 4th
    raw = text.encode()
    student = tiling([raw[0:4], raw[4:5], raw[5:8]])
    teacher = tiling([raw[0:5], raw[5:8]])  # one token for " 😀"
    spans = align_spans(student, teacher, len(raw))
    assert [(s.start, s.end, list(s.student), list(s.teacher)) for s in spans] == [
        (0, 5, [0, 1], [0]),
        (5, 8, [2], [1]),
    ]


def test_end_of_turn_tokens_form_the_final_empty_span_and_special_tokens_join_the_next():
    text = "Hi there"
    student = [(0, 2), (2, 2), (2, 8), (8, 8)]  # a stray special token at byte 2, then EOS
    teacher = [(0, 2), (2, 3), (3, 8), (8, 8)]  # ... and the teacher's end-of-turn
    spans = align_spans(student, teacher, len(text))
    assert [(s.start, s.end, list(s.student), list(s.teacher)) for s in spans] == [
        (0, 2, [0], [0]),
        (2, 8, [1, 2], [1, 2]),
        (8, 8, [3], [3]),
    ]


def test_leftover_tokens_of_one_side_join_the_last_span():
    spans = align_spans(
        [(0, 2)], [(0, 2), (2, 2)], 2
    )  # the teacher scored an end-of-turn, the student did not stop
    assert spans == [AlignedSpan(0, 2, range(0, 1), range(0, 2))]
    assert span_of_token(spans, 2, "teacher") == [0, 0]


def test_spans_that_do_not_tile_the_text_are_refused():
    with pytest.raises(ValueError, match="teacher token 1"):
        align_spans([(0, 3)], [(0, 1), (2, 3)], 3)
    with pytest.raises(ValueError, match="student tokens cover bytes"):
        check_tiling([(0, 2)], 3, "student")


def test_random_tilings_partition_and_keep_the_teachers_total_logprob():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 40)
        cuts_s = sorted(rng.sample(range(1, n), rng.randint(0, n - 1))) if n > 1 else []
        cuts_t = sorted(rng.sample(range(1, n), rng.randint(0, n - 1))) if n > 1 else []
        student = [(a, b) for a, b in zip([0, *cuts_s], [*cuts_s, n], strict=True)]
        teacher = [(a, b) for a, b in zip([0, *cuts_t], [*cuts_t, n], strict=True)]
        if rng.random() < 0.5:  # a finished answer: EOS and end-of-turn
            student.append((n, n))
            teacher.append((n, n))
        spans = align_spans(student, teacher, n)
        assert_partition(spans, len(student), len(teacher), n)
        common = ({b for _, b in student} & {b for _, b in teacher}) | {n}
        assert {s.end for s in spans} == common  # spans close exactly where both sides have a boundary
        lp = [rng.uniform(-5, 0) for _ in teacher]
        assert math.isclose(sum(span_sums(lp, spans, "teacher")), sum(lp), abs_tol=1e-9)


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir):
    from transformers import AutoTokenizer

    from opd_common.embedded import gemma_teacher_dir

    return AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(gemma_teacher_dir())


@pytest.mark.parametrize(
    "text",
    ["Hello world, naïve café 😀 tokenization!\n\n  ok", " leading space", "数学 is math: 12345.", "😀😀"],
)
def test_real_tokenizers_student_ids_and_teacher_text_align(tokenizers, text):
    student_tok, teacher_tok = tokenizers
    student_ids = student_tok(text, add_special_tokens=False)["input_ids"] + [student_tok.eos_token_id]
    # the student's side: its sampled ids spell the text, EOS adds nothing
    spelled, student_spans = ids_text(student_ids, vocab_bytes(student_tok))
    assert spelled == text and student_spans[-1] == (len(text.encode()), len(text.encode()))
    teacher_ids, teacher_spans = text_byte_spans(teacher_tok, text)
    end = len(text.encode())
    spans = align_spans(student_spans, [*teacher_spans, (end, end)], end)
    assert_partition(spans, len(student_ids), len(teacher_ids) + 1, end)
    assert spans[-1].start == spans[-1].end == end  # EOS against the end-of-turn


def test_ids_that_are_not_valid_utf8_still_tile_the_text(tokenizers):
    student_tok, _ = tokenizers
    ids = student_tok("a😀", add_special_tokens=False)["input_ids"]
    cut = ids[:-1]  # ends inside the emoji: its last byte is missing
    text, spans = ids_text(cut, vocab_bytes(student_tok))
    assert text.endswith("\ufffd")
    check_tiling(spans, len(text.encode()), "student")
