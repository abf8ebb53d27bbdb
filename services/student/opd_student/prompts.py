"""Prompt files: load and validate JSONL, render a prompt to token ids, and stream prompts in a resumable order.

A prompt file has one JSON object a line (see DESIGN.md, CLI):
`{"messages": [{"role": "user", "content": "..."}]}` or `{"prompt": "plain text"}`, with optional
`"teacher_messages"` (privileged context the teacher sees instead of the student's prompt), `"teacher"`
(which served teacher scores it), `"loss_spans"` (character ranges of the completion the loss is restricted
to, docs/methods.md) and `"id"`. The names "default-train" and "default-heldout" load the small set shipped
in this package; "default-privileged" is a part of default-train with reference answers in
`teacher_messages`, "default-privileged-heldout" the fact and arithmetic prompts of default-heldout with
theirs (held-out evaluation of self-distillation).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

SHIPPED = {
    "default-train": "prompts_train.jsonl",
    "default-heldout": "prompts_heldout.jsonl",
    "default-privileged": "prompts_privileged.jsonl",
    "default-privileged-heldout": "prompts_privileged_heldout.jsonl",
    # requests a safety-aligned model should decline, and harmless counterparts of the same form: the two sets
    # opd make-steering-vector contrasts for SafeSteer's steered teacher (recipes/safesteer.toml)
    "steer-harmful": "steer_harmful.jsonl",
    "steer-harmless": "steer_harmless.jsonl",
}
ALLOWED_KEYS = ("id", "messages", "prompt", "teacher_messages", "teacher", "loss_spans")


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names file:line and the field."""

    def __init__(self, source: str, line: int | None, field: str | None, problem: str):
        self.source, self.line, self.field = source, line, field
        where = source if line is None else f"{source}:{line}"
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}: {what}{problem}")


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: list[dict] | None = None
    prompt: str | None = None
    teacher_messages: list[dict] | None = None
    teacher: str | None = None
    loss_spans: list[list[int]] | None = None  # [start, end) character ranges of the completion


def load_prompts(path_or_name: str | Path) -> list[Prompt]:
    """All prompts of a JSONL file, or of a shipped set by name ("default-train", "default-heldout")."""
    if str(path_or_name) in SHIPPED:
        resource = resources.files("opd_student") / "data" / SHIPPED[str(path_or_name)]
        return parse_prompts(resource.read_text(encoding="utf-8"), source=str(path_or_name))
    path = Path(path_or_name)
    if not path.is_file():
        shipped = ", ".join(SHIPPED)
        raise PromptFileError(str(path), None, None, f"no such file (shipped sets: {shipped})")
    return parse_prompts(path.read_text(encoding="utf-8"), source=str(path))


def parse_prompts(text: str, source: str = "<prompts>") -> list[Prompt]:
    """Prompts from JSONL text; blank lines are skipped, ids default to "<line number>"."""
    prompts: list[Prompt] = []
    first_line_of_id: dict[str, int] = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        prompt = _parse_line(line, source, line_no)
        if prompt.id in first_line_of_id:
            raise PromptFileError(
                source,
                line_no,
                "id",
                f"duplicate id {prompt.id!r} (first at line {first_line_of_id[prompt.id]})",
            )
        first_line_of_id[prompt.id] = line_no
        prompts.append(prompt)
    if not prompts:
        raise PromptFileError(source, None, None, "no prompts (the file is empty)")
    return prompts


def _parse_line(line: str, source: str, line_no: int) -> Prompt:
    def fail(field: str | None, problem: str) -> PromptFileError:
        return PromptFileError(source, line_no, field, problem)

    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise fail(None, f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise fail(None, f"expected a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - set(ALLOWED_KEYS))
    if unknown:
        raise fail(unknown[0], f"unknown key(s) {unknown}; allowed keys are {list(ALLOWED_KEYS)}")
    if ("messages" in row) == ("prompt" in row):
        raise fail("messages", "give exactly one of 'messages' (chat) or 'prompt' (plain text)")

    if "prompt" in row and not (isinstance(row["prompt"], str) and row["prompt"]):
        raise fail("prompt", "must be a non-empty string")
    for key in ("id", "teacher"):
        if key in row and not (isinstance(row[key], str) and row[key]):
            raise fail(key, "must be a non-empty string")
    messages = _check_messages(row.get("messages"), "messages", fail)
    teacher_messages = _check_messages(row.get("teacher_messages"), "teacher_messages", fail)
    return Prompt(
        id=row.get("id", str(line_no)),
        messages=messages,
        prompt=row.get("prompt"),
        teacher_messages=teacher_messages,
        teacher=row.get("teacher"),
        loss_spans=_check_spans(row.get("loss_spans"), fail),
    )


def _check_spans(value: Any, fail) -> list[list[int]] | None:
    if value is None:
        return None
    ok = isinstance(value, list) and all(
        isinstance(span, list)
        and len(span) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in span)
        and 0 <= span[0] < span[1]
        for span in value
    )
    if not ok:
        raise fail("loss_spans", "must be a list of [start, end] character offsets with 0 <= start < end")
    return value


def _check_messages(value: Any, field: str, fail) -> list[dict] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise fail(field, "must be a non-empty list of {role, content} objects")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise fail(
                f"{field}[{i}]", f"expected an object with role and content, got {type(message).__name__}"
            )
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise fail(f"{field}[{i}].{key}", "must be a string")
    return value


def render(prompt: Prompt, tokenizer, for_teacher: bool = False) -> list[int]:
    """Token ids of the prompt: chat messages through the tokenizer's chat template, ending with the
    assistant turn's header; plain text as is. With for_teacher, teacher_messages replace the prompt."""
    messages = prompt.messages
    if for_teacher and prompt.teacher_messages is not None:
        messages = prompt.teacher_messages
    if messages is None:
        # Plain text takes the tokenizer's own special tokens (BOS on models that expect one), as HF
        # generation does; chat templates already write every special token into the text.
        return list(tokenizer(prompt.prompt, add_special_tokens=True)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"prompt {prompt.id!r} has chat messages but the tokenizer has no chat template")
    # Render to text, then tokenize without extra special tokens: the same two steps as the teacher's
    # /v1/tokenize, so student and teacher see identical ids for identical messages.
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class PromptStream:
    """An endless stream of prompts: each epoch is a fresh permutation drawn from (seed, epoch), so the
    order depends only on the seed and the position can be saved and restored exactly."""

    def __init__(self, prompts: list[Prompt], seed: int = 0, shuffle: bool = True):
        if not prompts:
            raise ValueError("PromptStream needs at least one prompt")
        self.prompts = list(prompts)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0  # position inside the current epoch's order
        self._order_N = self._order(self.epoch)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.prompts))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))

    def __iter__(self) -> Iterator[Prompt]:
        return self

    def __next__(self) -> Prompt:
        if self.index >= len(self.prompts):
            self.epoch += 1
            self.index = 0
            self._order_N = self._order(self.epoch)
        prompt = self.prompts[int(self._order_N[self.index])]
        self.index += 1
        return prompt

    def take(self, n: int) -> list[Prompt]:
        """The next n prompts (crossing into the next epoch when needed)."""
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_prompts": len(self.prompts)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue exactly where `state` was taken; refuses a state from a different seed or prompt set."""
        for key, ours in (("seed", self.seed), ("num_prompts", len(self.prompts))):
            if key in state and state[key] != ours:
                raise ValueError(
                    f"prompt stream state has {key}={state[key]} but this stream has {key}={ours}; "
                    "resuming needs the same prompt file and seed"
                )
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= len(self.prompts):
            raise ValueError(f"prompt stream state out of range: epoch={epoch}, index={index}")
        self.epoch, self.index = epoch, index
        self._order_N = self._order(epoch)
