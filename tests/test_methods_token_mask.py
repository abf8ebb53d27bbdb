"""Token-restricted distillation: which completion tokens each mask rule keeps, on real tokenizations."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from opd_common.embedded import embedded_teacher_dir
from opd_student.methods.token_mask import TokenMaskRule, parse_token_ids, token_char_spans


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(embedded_teacher_dir())


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def kept_text(tokenizer, ids: list[int], keep: list[bool]) -> str:
    return tokenizer.decode([i for i, k in zip(ids, keep, strict=True) if k], skip_special_tokens=True)


def test_parse_token_ids(tmp_path):
    assert parse_token_ids("12, 345 678") == {12, 345, 678}
    assert parse_token_ids("  ") == frozenset()
    path = tmp_path / "ids.txt"
    path.write_text("7\n8,9\n")
    assert parse_token_ids(str(path)) == {7, 8, 9}
    with pytest.raises(ValueError, match="integers"):
        parse_token_ids("12, x")
    with pytest.raises(ValueError, match=">= 0"):
        parse_token_ids("-3")


def test_token_id_set_keeps_exactly_those_ids(tokenizer):
    ids = ids_of(tokenizer, "The answer is 1234 km, done.") + [tokenizer.eos_token_id]
    rule = TokenMaskRule.from_config(f"{ids[1]}, {tokenizer.eos_token_id}", "")
    keep = rule.mask(ids, tokenizer)
    assert keep == [i in (ids[1], tokenizer.eos_token_id) for i in ids]
    assert keep[1] and keep[-1] and sum(keep) == 2


def test_regex_keeps_the_tokens_of_each_match(tokenizer):
    ids = ids_of(tokenizer, "The answer is 1234 km, done.") + [tokenizer.eos_token_id]
    keep = TokenMaskRule.from_config("", r"\d+").mask(ids, tokenizer)
    assert kept_text(tokenizer, ids, keep) == "1234"
    assert not keep[-1]  # EOS adds no text: only the id rule can select it
    keep = TokenMaskRule.from_config("", r"answer|done").mask(ids, tokenizer)
    assert kept_text(tokenizer, ids, keep) == " answer done"


def test_regex_across_a_character_split_over_tokens(tokenizer):
    ids = ids_of(tokenizer, "café ☕ 42")  # the emoji is three byte tokens, each undecodable alone
    text, offsets = token_char_spans(ids, tokenizer)
    assert text == "café ☕ 42"
    assert offsets[-1][1] == len(text) and all(a <= b for a, b in offsets)
    assert all(offsets[t][0] <= offsets[t + 1][0] for t in range(len(ids) - 1))
    keep = TokenMaskRule.from_config("", "☕").mask(ids, tokenizer)
    assert kept_text(tokenizer, ids, keep).strip() == "☕"  # all three byte tokens, nothing else


def test_spans_from_the_data_and_union_with_other_rules(tokenizer):
    ids = ids_of(tokenizer, "Hello world, goodbye")
    rule = TokenMaskRule()
    assert rule.mask(ids, tokenizer) is None  # no rule: all tokens count
    assert kept_text(tokenizer, ids, rule.mask(ids, tokenizer, [[6, 11]])) == " world"
    assert kept_text(tokenizer, ids, rule.mask(ids, tokenizer, [[0, 1], [13, 15]])) == "Hello goodbye"
    union = TokenMaskRule.from_config(str(ids[2]), "").mask(ids, tokenizer, [[6, 11]])  # "," by id
    assert kept_text(tokenizer, ids, union) == " world,"


def test_bad_regex_is_a_clear_error():
    with pytest.raises(ValueError, match="loss_regex"):
        TokenMaskRule.from_config("", "(unclosed")
