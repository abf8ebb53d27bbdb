"""Top-k scoring from hidden states, a chunk of positions at a time.

Materialising logits for every position costs N × V floats (4 × 2048 tokens × 49k vocab = 1.6 GB in
fp32, twice that with log-softmax); computing the lm_head and log-softmax only on completion positions,
`chunk_tokens` rows at a time, bounds the peak at chunk_tokens × V whatever the sequence length.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from opd_client.head import finish_logits

# log of the smallest normal float32: the floor for tail_logprob when top-k covers (nearly) all mass,
# so the response stays finite (log 0 = -inf would poison a trainer's KL).
TAIL_LOGPROB_FLOOR = math.log(torch.finfo(torch.float32).tiny)


@torch.inference_mode()
def score_hidden(
    hidden_N_H: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    targets_N: torch.Tensor,
    top_k: int,
    temperature: float = 1.0,
    score_ids_N_M: torch.Tensor | None = None,
    chunk_tokens: int = 512,
    softcap: float | None = None,
    ranks: bool = False,
    logit_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Per row: logprob of the target, top-k ids/logprobs, log tail mass, logprobs of score ids (fp32, CPU).

    With `ranks`, also "token_ranks": 1 + the number of vocabulary entries with a strictly larger logprob
    than the target's (exact over the whole vocabulary, whether or not the target is in the top-k).
    """
    token_lp, top_ids, top_lp, tail_lp, score_lp, token_rank = [], [], [], [], [], []
    for start in range(0, hidden_N_H.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        logprobs_C_V = logprobs_of(lm_head(hidden_N_H[rows]), temperature, softcap, logit_scale)
        targets_C = targets_N[rows].to(logprobs_C_V.device)
        token_lp.append(logprobs_C_V.gather(1, targets_C[:, None])[:, 0])
        if ranks:  # before the in-place scatter below overwrites the top-k entries
            token_rank.append((logprobs_C_V > token_lp[-1][:, None]).sum(-1) + 1)
        values_C_K, ids_C_K = logprobs_C_V.topk(top_k, dim=-1, sorted=True)
        top_ids.append(ids_C_K)
        top_lp.append(values_C_K)
        if score_ids_N_M is not None:
            score_lp.append(logprobs_C_V.gather(1, score_ids_N_M[rows].to(logprobs_C_V.device)))
        # The tail is a logsumexp over the non-top-k entries, not log(1 - Σp): the subtraction loses all
        # precision when top-k holds nearly all the mass. In place: the chunk is not needed afterwards.
        rest_C_V = logprobs_C_V.scatter_(1, ids_C_K, float("-inf"))
        tail_lp.append(rest_C_V.logsumexp(-1).clamp_min(TAIL_LOGPROB_FLOOR))
        del logprobs_C_V, rest_C_V
    out = {
        "token_logprobs": torch.cat(token_lp).cpu(),
        "top_ids": torch.cat(top_ids).to(torch.int32).cpu(),
        "top_logprobs": torch.cat(top_lp).cpu(),
        "tail_logprobs": torch.cat(tail_lp).cpu(),
    }
    if score_ids_N_M is not None:
        out["score_logprobs"] = torch.cat(score_lp).cpu()
    if ranks:
        out["token_ranks"] = torch.cat(token_rank).to(torch.int64).cpu()
    return out


def logprobs_of(
    logits_C_V: torch.Tensor, temperature: float, softcap: float | None, logit_scale: float = 1.0
) -> torch.Tensor:
    """fp32 log-softmax of lm_head outputs (scaled, soft-capped, divided by temperature): the one definition
    of a teacher logprob, shared by scoring and generation so both report the same numbers, and by trainers
    that compute it from hidden states (opd_client.head.finish_logits is the formula)."""
    return torch.log_softmax(finish_logits(logits_C_V, logit_scale, softcap, temperature), dim=-1)
