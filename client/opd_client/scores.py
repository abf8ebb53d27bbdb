"""The scoring result as arrays: what clients return and what the backend produces."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SequenceScores:
    """Teacher scores of one sequence's completion; T = completion length, K = top_k, M = score ids."""

    token_logprobs_T: np.ndarray  # float32 [T]    logprob of the actual token
    top_ids_T_K: np.ndarray  # int32   [T, K] descending by logprob
    top_logprobs_T_K: np.ndarray  # float32 [T, K]
    tail_logprob_T: np.ndarray  # float32 [T]    log(1 - sum of top-k p), floored so it stays finite
    score_logprobs_T_M: np.ndarray | None = None  # float32 [T, M] logprobs of the requested score_ids

    @property
    def num_tokens(self) -> int:
        return int(self.token_logprobs_T.shape[0])


@dataclass
class ScoreResult:
    """A whole /v1/score answer."""

    model: str
    sequences: list[SequenceScores]
    scored_tokens: int
    forward_tokens: int
