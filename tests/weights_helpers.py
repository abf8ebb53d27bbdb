"""Scores of given weights from an in-process forward, and how far a service's answer is from them: the
reference for the live weight update tests (test_live_weights.py, test_teacher_follow.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from opd_client.scores import ScoreResult

TOP_K = 8
SEQUENCES = [
    {"token_ids": [1, 504, 3575, 282, 905, 17, 42, 7, 19], "prompt_len": 3},
    {"token_ids": [1, 504, 3575, 282, 2000, 33], "prompt_len": 3},
    {"token_ids": [1, 9690, 198, 2830, 4, 5, 6, 7, 8, 9, 10], "prompt_len": 2},
]


def reference(model_dir: Path, state: dict[str, torch.Tensor] | None = None) -> list[dict[str, np.ndarray]]:
    """The scores of SEQUENCES from an in-process fp32 forward of model_dir's model with these weights (None:
    its own), one sequence at a time."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if state is not None:
        model.load_state_dict(state, strict=False)  # lm_head.weight follows the embedding it is tied to
    out = []
    with torch.inference_mode():
        for seq in SEQUENCES:
            ids, p = seq["token_ids"], seq["prompt_len"]
            logprobs_T_V = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)[p - 1 : -1]
            targets_T = torch.tensor(ids[p:])
            top = logprobs_T_V.topk(TOP_K, dim=-1)
            rest_T_V = logprobs_T_V.scatter(-1, top.indices, float("-inf"))
            out.append(
                {
                    "token_logprobs_T": logprobs_T_V.gather(-1, targets_T[:, None])[:, 0].numpy(),
                    "top_logprobs_T_K": top.values.numpy(),
                    "tail_logprob_T": torch.logsumexp(rest_T_V, -1).numpy(),
                    "logprobs_T_V": logprobs_T_V.numpy(),
                }
            )
    return out


def max_diff(result: ScoreResult, ref: list[dict[str, np.ndarray]]) -> float:
    """Largest |difference| over every logprob, and between each returned top id's logprob and the
    reference's logprob of that id (two ids within TOL of each other may come in either order)."""
    worst = 0.0
    for got, want in zip(result.sequences, ref, strict=True):
        for key in ("token_logprobs_T", "top_logprobs_T_K", "tail_logprob_T"):
            worst = max(worst, float(np.max(np.abs(getattr(got, key) - want[key]))))
        of_ids_T_K = np.take_along_axis(want["logprobs_T_V"], got.top_ids_T_K.astype(np.int64), axis=-1)
        worst = max(worst, float(np.max(np.abs(of_ids_T_K - got.top_logprobs_T_K))))
    return worst
