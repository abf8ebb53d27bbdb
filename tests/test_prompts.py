"""Prompt files: validation errors name file:line and field; shipped sets; chat rendering; resumable stream."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from opd_common.embedded import embedded_teacher_dir
from opd_student.prompts import (
    ALLOWED_KEYS,
    Prompt,
    PromptFileError,
    PromptStream,
    load_prompts,
    render,
)

GOOD = '{"id": "a", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(embedded_teacher_dir())


def write_lines(tmp_path, *lines: str):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("bad_line", "field", "phrase"),
    [
        ('{"messages": [', None, "not valid JSON"),
        ('["a list"]', None, "expected a JSON object"),
        ('{"id": "x"}', "messages", "exactly one of"),
        ('{"messages": [{"role": "user", "content": "q"}], "prompt": "p"}', "messages", "exactly one of"),
        ('{"messages": "hello"}', "messages", "non-empty list"),
        ('{"messages": []}', "messages", "non-empty list"),
        ('{"messages": ["hello"]}', "messages[0]", "role and content"),
        ('{"messages": [{"role": "user", "content": 3}]}', "messages[0].content", "must be a string"),
        ('{"messages": [{"content": "q"}]}', "messages[0].role", "must be a string"),
        ('{"prompt": ""}', "prompt", "non-empty string"),
        ('{"prompt": "p", "teacher_messages": [{"role": "user"}]}', "teacher_messages[0].content", "string"),
        ('{"prompt": "p", "teacher": 7}', "teacher", "non-empty string"),
        ('{"prompt": "p", "sytem": "typo"}', "sytem", "allowed keys"),
        ('{"id": "a", "prompt": "p"}', "id", "duplicate id 'a' (first at line 1)"),
    ],
)
def test_loader_errors_name_file_line_and_field(tmp_path, bad_line, field, phrase):
    path = write_lines(tmp_path, GOOD, "", bad_line)  # the bad line is line 3 (a blank line is skipped)
    with pytest.raises(PromptFileError) as info:
        load_prompts(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert info.value.line == 3
    assert info.value.field == field
    if field:
        assert f"field {field!r}" in message
    assert phrase in message


def test_unknown_key_error_lists_allowed_keys(tmp_path):
    path = write_lines(tmp_path, '{"prompt": "p", "answer": "x"}')
    with pytest.raises(PromptFileError) as info:
        load_prompts(path)
    for key in ALLOWED_KEYS:
        assert key in str(info.value)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(PromptFileError, match=r"empty\.jsonl: no prompts"):
        load_prompts(empty)
    with pytest.raises(PromptFileError, match="no such file"):
        load_prompts(tmp_path / "missing.jsonl")


def test_valid_file_parses_every_field(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
        {
            "id": "p2",
            "prompt": "plain",
            "teacher": "big",
            "teacher_messages": [{"role": "user", "content": "t"}],
        },
    ]
    prompts = load_prompts(write_lines(tmp_path, *(json.dumps(r) for r in rows)))
    assert prompts[0] == Prompt(id="1", messages=rows[0]["messages"])
    assert prompts[1] == Prompt(
        id="p2", prompt="plain", teacher="big", teacher_messages=[{"role": "user", "content": "t"}]
    )


def test_shipped_sets_load_and_do_not_overlap():
    train = load_prompts("default-train")
    heldout = load_prompts("default-heldout")
    assert 180 <= len(train) <= 240
    assert 28 <= len(heldout) <= 40
    texts = lambda ps: {p.messages[-1]["content"].strip().lower() for p in ps}  # noqa: E731
    assert len(texts(train)) == len(train)
    assert len(texts(heldout)) == len(heldout)
    assert not texts(train) & texts(heldout)
    assert not {p.id for p in train} & {p.id for p in heldout}
    assert all(p.messages and p.messages[-1]["role"] == "user" for p in train + heldout)


def test_shipped_prompts_are_short(tokenizer):
    lengths = [
        len(render(p, tokenizer)) for p in load_prompts("default-train") + load_prompts("default-heldout")
    ]
    assert max(lengths) <= 80, max(lengths)


def test_render_uses_chat_template(tokenizer):
    prompt = load_prompts("default-heldout")[0]
    ids = render(prompt, tokenizer)
    expected = tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
    assert ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    direct = tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=True)
    direct_ids = direct["input_ids"] if hasattr(direct, "keys") else direct
    assert ids == list(direct_ids)
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n")
    assert prompt.messages[0]["content"] in text


def test_render_plain_text_and_teacher_messages(tokenizer):
    prompt = Prompt(
        id="x",
        prompt="The capital of France is",
        teacher_messages=[{"role": "user", "content": "Hint: Paris. Complete: The capital of France is"}],
    )
    assert render(prompt, tokenizer) == tokenizer("The capital of France is")["input_ids"]
    teacher_ids = render(prompt, tokenizer, for_teacher=True)
    assert tokenizer.decode(teacher_ids).startswith("<|im_start|>")
    assert "Hint: Paris." in tokenizer.decode(teacher_ids)
    # Without teacher_messages the teacher sees the student's prompt.
    chat = Prompt(id="y", messages=[{"role": "user", "content": "hi"}])
    assert render(chat, tokenizer, for_teacher=True) == render(chat, tokenizer)


def _ids(prompts: list[Prompt]) -> list[str]:
    return [p.id for p in prompts]


def test_stream_resume_continues_exactly():
    prompts = load_prompts("default-heldout")
    n = len(prompts)
    uninterrupted = PromptStream(prompts, seed=7)
    expected = _ids(uninterrupted.take(3 * n + 5))

    first = PromptStream(prompts, seed=7)
    head = _ids(first.take(n + 11))  # stop inside the second epoch
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    assert state["epoch"] == 1 and state["index"] == 11

    resumed = PromptStream(prompts, seed=7)
    resumed.load_state_dict(state)
    tail = _ids(resumed.take(2 * n - 6))
    assert head + tail == expected


def test_stream_epochs_are_permutations_that_differ():
    prompts = load_prompts("default-heldout")
    n = len(prompts)
    stream = PromptStream(prompts, seed=0)
    epoch0, epoch1 = _ids(stream.take(n)), _ids(stream.take(n))
    assert sorted(epoch0) == sorted(epoch1) == sorted(_ids(prompts))
    assert epoch0 != epoch1
    assert _ids(PromptStream(prompts, seed=1).take(n)) != epoch0
    assert _ids(PromptStream(prompts, seed=0, shuffle=False).take(n)) == _ids(prompts)


def test_stream_refuses_state_from_another_prompt_set():
    prompts = load_prompts("default-heldout")
    state = PromptStream(prompts, seed=3).state_dict()
    with pytest.raises(ValueError, match="num_prompts"):
        PromptStream(prompts[:-1], seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PromptStream(prompts, seed=4).load_state_dict(state)
