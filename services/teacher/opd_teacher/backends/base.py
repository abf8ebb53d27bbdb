"""What every white-box backend takes and gives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from opd_client.schema import ModelInfo
from opd_client.scores import SequenceScores

if TYPE_CHECKING:  # both import torch; the engine, which sees only this protocol, does not
    from opd_teacher.backends.generate import Generation, SamplingParams
    from opd_teacher.backends.head import HeadExport


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
    """What the engine, the server and the faces use of a teacher: HFBackend (backends/hf.py) has it all; the
    black-box backend (blackbox/backend.py) refuses what needs logprobs with an InvalidRequest naming
    POST /v1/chunk-score.

    score() with top_k = 0 computes no logprobs: every item then has return_hidden (validation). With `ranks`
    each result is a RankedScores (token_rank_T: the OpenAI endpoints' prompt_logprobs)."""

    info: ModelInfo
    bos_token_id: int | None
    last_forward_tokens: int  # tokens the last score() ran through the model (shared prompts once)
    head: HeadExport | None  # the output head served by GET /v1/models/{name}/head; None: none served

    def warm_up(self) -> None:
        """Before the first request (on a worker thread): pay for lazy initialisation, check what must work."""
        ...

    def score(
        self, items: list[ScoreItem], top_k: int, temperature: float, ranks: bool = False
    ) -> list[SequenceScores]: ...

    def start_generation(self, prompt_ids: list[int], params: SamplingParams) -> Generation: ...

    def tokenize_text(self, text: str, add_special_tokens: bool) -> list[int]: ...

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each id decoded on its own: how OpenAI and vLLM show tokens in logprobs."""
        ...
