"""Several teachers: which teacher (a model name on the service) scores each prompt's rollouts.

In order: the prompt file's `"teacher"` field; else the first rule of `teacher_rules` whose regular
expression is found in the prompt's text; else `teacher_model` (None: the service's first teacher).
Rules are written `PATTERN => NAME`, separated by `;` or new lines, e.g.
`teacher_rules = "\\d+ *[-+*/] *\\d+ => math; (?i)poem|story => writer"`.

The trainer already sends one scoring request per teacher name per step (TeacherLink.submit); the
per-teacher numbers are in teacher_metrics.py.
"""

from __future__ import annotations

import re

from opd_student.prompts import Prompt

Rule = tuple[re.Pattern, str]


def parse_teacher_rules(spec: str) -> list[Rule]:
    rules: list[Rule] = []
    for part in re.split(r"[;\n]", spec):
        if not part.strip():
            continue
        pattern, sep, name = part.rpartition("=>")
        pattern, name = pattern.strip(), name.strip()
        if not sep or not pattern or not name:
            raise ValueError(f"teacher_rules: {part.strip()!r} is not of the form 'PATTERN => NAME'")
        try:
            rules.append((re.compile(pattern), name))
        except re.error as e:
            raise ValueError(f"teacher_rules: {pattern!r} is not a valid regular expression: {e}") from None
    return rules


def prompt_text(prompt: Prompt) -> str:
    """What rules are matched against: the plain prompt, or the chat messages' contents, one a line."""
    if prompt.messages is None:
        return prompt.prompt or ""
    return "\n".join(m["content"] for m in prompt.messages)


def route(prompt: Prompt, rules: list[Rule], default: str | None) -> str | None:
    if prompt.teacher:
        return prompt.teacher
    text = prompt_text(prompt)
    for pattern, name in rules:
        if pattern.search(text):
            return name
    return default


def teachers_used(prompts: list[Prompt], rules: list[Rule], default: str | None) -> list[str | None]:
    """Every teacher name some prompt routes to, in first-use order (for the start-up checks)."""
    names: dict[str | None, None] = {}
    for p in prompts:
        names.setdefault(route(p, rules, default), None)
    return list(names)
