"""The scoring result as arrays: what clients return and what the backend produces."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SequenceScores:
    """Teacher scores of one sequence's completion; T = completion length, K = top_k, M = score ids,
    D = the teacher's hidden size. The four logprob arrays are None when the request had top_k = 0."""

    token_logprobs_T: np.ndarray | None  # float32 [T]    logprob of the actual token
    top_ids_T_K: np.ndarray | None  # int32   [T, K] descending by logprob
    top_logprobs_T_K: np.ndarray | None  # float32 [T, K]
    tail_logprob_T: np.ndarray | None  # float32 [T]    log(1 - sum of top-k p), floored so it stays finite
    score_logprobs_T_M: np.ndarray | None = None  # float32 [T, M] logprobs of the requested score_ids
    # float32 [T, D] with return_hidden: the teacher's final hidden states; row t predicts completion token
    # t (opd_client.head.logits_from_hidden turns them into the teacher's full logits)
    hidden_T_D: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        rows = self.token_logprobs_T if self.token_logprobs_T is not None else self.hidden_T_D
        assert rows is not None, "a sequence's scores hold logprobs (top_k > 0), hidden states, or both"
        return int(rows.shape[0])


@dataclass
class ScoreResult:
    """A whole /v1/score answer."""

    model: str
    sequences: list[SequenceScores]
    scored_tokens: int
    forward_tokens: int
    # The wire dtype of the sequences' hidden_T_D (the service's choice of the request's hidden_dtype or
    # the model's dtype); None without return_hidden.
    hidden_dtype: str | None = None
    # The teacher weights these scores came from (0 as loaded, +1 per live update); None: not said (a
    # black-box teacher, or a service older than live updates).
    weights_version: int | None = None
