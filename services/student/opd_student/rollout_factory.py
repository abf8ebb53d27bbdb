"""The one place a Rollout is made: training samples, held-out samples, black-box evaluation and the fixed
sequences of GKD mixing all come through here, so teacher routing and privileged context mean the same
everywhere (the held-out KL is measured against the teacher, and the teacher prompt, that training used).

Per prompt: the teacher that scores it (methods/routing.py: the prompt's `teacher`, else the first
matching `teacher_rules`, else the default), what the teacher sees before the completion (the prompt's
`teacher_messages` when `privileged_context` is on, else the student's own prompt) as token ids for a
white-box teacher and as a chat for a black-box one, and the prompt's loss spans.
"""

from __future__ import annotations

from opd_student.methods.routing import Rule, route
from opd_student.prompts import Prompt, render
from opd_student.rollouts import Rollout


class RolloutFactory:
    def __init__(
        self,
        tokenizer,
        teacher_model: str | None = None,
        rules: list[Rule] | None = None,
        privileged_context: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.teacher_model = teacher_model
        self.rules = rules or []
        self.privileged_context = privileged_context

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The student's view of the prompt, as token ids."""
        return render(prompt, self.tokenizer)

    def group(
        self, prompt: Prompt, prompt_ids: list[int], completions_G: list[list[int]], on_policy: bool = True
    ) -> list[Rollout]:
        """One Rollout per completion of one prompt (the teacher's context is rendered once)."""
        prefix_ids = self.teacher_prefix_ids(prompt)
        chat = self.teacher_chat(prompt)
        teacher = route(prompt, self.rules, self.teacher_model)
        return [
            Rollout(
                prompt_ids,
                completion,
                prefix_ids,
                teacher,
                prompt.id,
                on_policy=on_policy,
                loss_spans=prompt.loss_spans,
                teacher_chat=chat,
                teacher_text=self.teacher_text(prompt),
            )
            for completion in completions_G
        ]

    def rollouts(
        self, prompts_P: list[Prompt], prompt_ids_P: list[list[int]], completions_P_G: list[list[list[int]]]
    ) -> list[Rollout]:
        """The sampled completions of several prompts, prompt-major."""
        out: list[Rollout] = []
        for prompt, ids, group in zip(prompts_P, prompt_ids_P, completions_P_G, strict=True):
            out += self.group(prompt, ids, group)
        return out

    def privileged(self, prompt: Prompt) -> bool:
        return prompt.teacher_messages is not None and self.privileged_context

    def teacher_prefix_ids(self, prompt: Prompt) -> list[int] | None:
        """The white-box teacher's prompt when it differs from the student's (privileged context)."""
        return render(prompt, self.tokenizer, for_teacher=True) if self.privileged(prompt) else None

    def teacher_text(self, prompt: Prompt) -> str | None:
        """A plain-text prompt as a text-based teacher with its own tokenizer sees it (None: a chat)."""
        return None if self.privileged(prompt) or prompt.messages is not None else prompt.prompt

    def teacher_chat(self, prompt: Prompt) -> list[dict]:
        """The chat a text-based (black-box) teacher sees before the completion."""
        if self.privileged(prompt):
            return prompt.teacher_messages  # type: ignore[return-value]
        if prompt.messages is not None:
            return prompt.messages
        return [{"role": "user", "content": prompt.prompt}]
