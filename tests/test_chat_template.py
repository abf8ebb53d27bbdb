"""The teacher's chat template for --api-prefill completions: ChatML by default, a tokenizer's own
template exactly as transformers renders it, a Jinja file, and clear errors for a bad path or template."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from opd_common.embedded import embedded_teacher_dir
from opd_teacher.blackbox.chat_template import ChatTemplate

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def test_chatml_default_writes_the_turns_then_the_partial_answer():
    template = ChatTemplate.load(None)
    text = template.render(MESSAGES, "Blue is")
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
        "<|im_start|>assistant\nBlue is"
    )
    assert template.stop == ["<|im_end|>"]


def test_a_tokenizer_directory_renders_as_transformers_does():
    path = embedded_teacher_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    template = ChatTemplate.load(path)
    for messages in (MESSAGES, MESSAGES[1:]):  # SmolLM2's template adds its own system turn when none
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert template.render(messages, " Red") == expected + " Red"
    assert template.stop == [tokenizer.eos_token]


def test_a_jinja_file_and_the_errors(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] ")
    assert ChatTemplate.load(path).render(MESSAGES[1:], "Green") == "[user] Name a colour.\n[assistant] Green"
    with pytest.raises(ValueError, match="--api-chat-template .*nope: no such file"):
        ChatTemplate.load(tmp_path / "nope")
    path.write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="not a valid Jinja template"):
        ChatTemplate.load(path)
