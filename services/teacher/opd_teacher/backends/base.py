"""What every white-box backend takes and gives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from opd_client.schema import ModelInfo
from opd_client.scores import SequenceScores


@dataclass(frozen=True)
class ScoreItem:
    """One validated sequence as the teacher sees it."""

    context_ids: list[int]  # the teacher's prompt: teacher_prefix_ids, else token_ids[:prompt_len]
    completion_ids: list[int]  # the tokens to score, T = len(completion_ids) >= 1
    score_ids_T_M: np.ndarray | None = None  # int64 [T, M]
    # Per item, not per batch: one forward serves items that want hidden states and items that do not.
    return_hidden: bool = False  # also give SequenceScores.hidden_T_D

    @property
    def forward_len(self) -> int:
        return len(self.context_ids) + len(self.completion_ids)


class Backend(Protocol):
    """score() with top_k = 0 computes no logprobs: every item then has return_hidden (validation)."""

    info: ModelInfo
    bos_token_id: int | None
    last_forward_tokens: int  # tokens the last score() ran through the model (shared prompts once)

    def score(self, items: list[ScoreItem], top_k: int, temperature: float) -> list[SequenceScores]: ...

    def tokenize_text(self, text: str, add_special_tokens: bool) -> list[int]: ...

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str: ...
