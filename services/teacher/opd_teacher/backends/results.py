"""Scoring outputs cut back into one SequenceScores per item (from the flat [N, ...] rows of a forward)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from opd_client.scores import SequenceScores
from opd_teacher.backends.base import ScoreItem


@dataclass
class RankedScores(SequenceScores):
    """SequenceScores plus each token's rank: 1 + the vocabulary entries with a larger logprob (the OpenAI
    endpoints' prompt_logprobs need it; /v1/score never sends it)."""

    token_rank_T: np.ndarray | None = None  # int64 [T]


def pad_cat(score_ids: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [T_i, M_i] id blocks into [N, max M], padding with id 0 (sliced off in split_scores)."""
    width = max(s.shape[1] for s in score_ids)
    return torch.cat([torch.nn.functional.pad(s, (0, width - s.shape[1])) for s in score_ids])


def hidden_rows(picks: list[torch.Tensor], items: list[ScoreItem]) -> list[np.ndarray | None]:
    """float32 [T_i, D] hidden states of the items that asked for them (exact: bf16/fp16 widen losslessly)."""
    return [
        pick.float().cpu().numpy() if item.return_hidden else None
        for pick, item in zip(picks, items, strict=True)
    ]


def split_scores(
    out: dict[str, torch.Tensor] | None, hidden: list[np.ndarray | None], items: list[ScoreItem]
) -> list[SequenceScores]:
    """Per item: its rows of `out` (score_hidden's arrays; None with top_k = 0) and its hidden states."""
    if out is None:  # top_k = 0: hidden states only, no logprobs were computed
        return [SequenceScores(None, None, None, None, hidden_T_D=h) for h in hidden]
    arrays = {k: v.numpy() for k, v in out.items()}
    results: list[SequenceScores] = []
    start = 0
    for item, hidden_T_D in zip(items, hidden, strict=True):
        rows = slice(start, start + len(item.completion_ids))
        score_lp = None
        if item.score_ids_T_M is not None:
            score_lp = np.ascontiguousarray(arrays["score_logprobs"][rows, : item.score_ids_T_M.shape[1]])
        fields = dict(
            token_logprobs_T=arrays["token_logprobs"][rows],
            top_ids_T_K=arrays["top_ids"][rows],
            top_logprobs_T_K=arrays["top_logprobs"][rows],
            tail_logprob_T=arrays["tail_logprobs"][rows],
            score_logprobs_T_M=score_lp,
            hidden_T_D=hidden_T_D,
        )
        if "token_ranks" in arrays:
            results.append(RankedScores(**fields, token_rank_T=arrays["token_ranks"][rows]))
        else:
            results.append(SequenceScores(**fields))
        start += len(item.completion_ids)
    return results
