"""The teacher's chat template, applied by opd for `--api-prefill completions`.

A raw-text `/v1/completions` endpoint continues exactly the text it is given, so opd writes the chat turns
in the teacher's own format and appends the student's partial answer after the assistant header: the
teacher then continues that answer token for token, with no instruction in between. The template comes
from `--api-chat-template`: a tokenizer directory (its `chat_template`), a Jinja file, or by default ChatML
(`<|im_start|>role\\n...<|im_end|>`), the format of Qwen, SmolLM2 and many open models.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_STOP = ["<|im_end|>"]


class ChatTemplate:
    """Renders chat messages plus a partial answer as the teacher's raw prompt text."""

    def __init__(self, source: str, stop: list[str], name: str) -> None:
        try:
            # The sandbox, as transformers renders templates: a template file is data, not code.
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ValueError(f"--api-chat-template {name}: not a valid Jinja template: {e}") from None
        self.stop = stop
        self.name = name
        self._special: dict[str, str] = {}

    @classmethod
    def load(cls, path: Path | None) -> ChatTemplate:
        """ChatML when `path` is None; a tokenizer directory's template; or a Jinja template file."""
        if path is None:
            return cls(CHATML, CHATML_STOP, "ChatML (the default)")
        if path.is_dir():
            return cls._from_tokenizer(path)
        if not path.is_file():
            raise ValueError(f"--api-chat-template {path}: no such file or tokenizer directory")
        return cls(path.read_text(), [], str(path))

    @classmethod
    def _from_tokenizer(cls, path: Path) -> ChatTemplate:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        source = tokenizer.chat_template
        if not isinstance(source, str):
            raise ValueError(f"--api-chat-template {path}: that tokenizer has no (single) chat_template")
        eos = tokenizer.eos_token
        template = cls(source, [eos] if isinstance(eos, str) else [], f"the chat template of {path}")
        template._special = {"bos_token": tokenizer.bos_token or "", "eos_token": eos or ""}
        return template

    def render(self, messages: list[dict], prefix: str) -> str:
        """The prompt up to the assistant's turn, then `prefix` as the start of its answer."""
        try:
            head = self._template.render(messages=messages, add_generation_prompt=True, **self._special)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template {self.name} failed on these messages: {e}") from None
        return head + prefix


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)
