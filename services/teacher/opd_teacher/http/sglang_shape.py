"""SGLang's `/generate` answer for one prompt, built from opd's scores of its tokens.

The shape is SGLang's (v0.5.23: `srt/managers/tokenizer_manager.py` `_handle_batch_output` and
`add_logprob_to_meta_info`, `srt/managers/scheduler_components/logprob_result_processor.py`,
`srt/managers/schedule_batch.py` FINISH_LENGTH / FINISH_MATCHED_*):

    {"text", "output_ids", "meta_info": {"id", "finish_reason", "prompt_tokens", "completion_tokens",
     "cached_tokens", "weight_version", "input_token_logprobs", "output_token_logprobs",
     "input_top_logprobs", "output_top_logprobs", "input_token_ids_logprobs", "output_token_ids_logprobs",
     "hidden_states"}}

- every logprob entry is `[logprob, token_id, text]`, text null unless return_text_in_logprobs;
- `input_*` cover the input tokens from logprob_start_len = s on, and their first entry has no logprob
  (`[null, ids[s], null]`, and null in the top/ids lists): SGLang prepends None and drops the sampling
  position's values, whatever s is. Entry i > 0 is token s + i given the tokens before it;
- `*_top_logprobs` only with top_logprobs_num > 0, `*_token_ids_logprobs` only with token_ids_logprob
  (the same ids at every position), each a list of entries in descending / requested order;
- `hidden_states` = [the input's rows [L][D], then one [D] row per decode step] (the final hidden state,
  after the final norm, at each position; a token's row comes from the forward that read it, so the last
  generated token has none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from opd_client.scores import SequenceScores
from opd_teacher.http.openai_shape import TokenText
from opd_teacher.http.sglang_request import Prompt


@dataclass(frozen=True)
class Scored:
    """opd's scores of `tokens[prompt_len:]` for one prompt (tokens = input + output [+ a pad])."""

    tokens: list[int]
    prompt_len: int
    scores: SequenceScores | None  # None: nothing needed scoring


def finish_reason(output_ids: list[int], reason: str | None, stop_reason: str | int | None) -> dict:
    if reason == "stop":  # a stop string, a stop token, or EOS (the last token)
        return {"type": "stop", "matched": stop_reason if stop_reason is not None else output_ids[-1]}
    return {"type": "length", "length": len(output_ids)}


def answer(
    prompt: Prompt,
    output_ids: list[int],
    output_text: str,
    finish: dict,
    scored: Scored,
    text: TokenText | None,
) -> dict:
    """One prompt's answer; `text` decodes tokens for return_text_in_logprobs (None: no text)."""
    length = len(prompt.ids)
    meta: dict[str, Any] = {
        "id": prompt.rid,
        "finish_reason": finish,
        "prompt_tokens": length,
        "weight_version": "default",
        "completion_tokens": len(output_ids),
        "cached_tokens": 0,
    }
    rows = _Rows(scored, text)
    if prompt.return_logprob:
        inputs = range(prompt.start + 1, length) if prompt.start < length else None
        outputs = range(length, length + len(output_ids))
        first = [[None, prompt.ids[prompt.start], None]] if inputs is not None else []
        meta["input_token_logprobs"] = first + [rows.token(t) for t in inputs or ()]
        meta["output_token_logprobs"] = [rows.token(t) for t in outputs]
        if prompt.top_n > 0:
            meta["input_top_logprobs"] = _with_none(inputs, lambda t: rows.top(t, prompt.top_n))
            meta["output_top_logprobs"] = [rows.top(t, prompt.top_n) for t in outputs]
        if prompt.token_ids is not None:
            ids = prompt.token_ids
            meta["input_token_ids_logprobs"] = _with_none(inputs, lambda t: rows.named(t, ids))
            meta["output_token_ids_logprobs"] = [rows.named(t, ids) for t in outputs]
    if prompt.hidden:
        meta["hidden_states"] = rows.hidden(length, len(output_ids))
    body: dict[str, Any] = {"text": output_text, "output_ids": list(output_ids), "meta_info": meta}
    if prompt.return_prompt_ids:
        body["prompt_token_ids"] = list(prompt.ids)
    return body


def _with_none(positions: range | None, row) -> list:
    return [] if positions is None else [None] + [row(t) for t in positions]


class _Rows:
    """Entries of the token at absolute position t, read from the scores of tokens[prompt_len:]."""

    def __init__(self, scored: Scored, text: TokenText | None) -> None:
        self.tokens, self.offset, self.scores, self.text = (
            scored.tokens,
            scored.prompt_len,
            scored.scores,
            text,
        )

    def _entry(self, logprob: float, token_id: int) -> list:
        return [logprob, token_id, None if self.text is None else self.text.decoded(token_id)]

    def _row(self, t: int) -> int:
        assert t >= self.offset and self.scores is not None, "position t was scored"
        return t - self.offset

    def token(self, t: int) -> list:
        assert self.scores is not None and self.scores.token_logprobs_T is not None
        return self._entry(float(self.scores.token_logprobs_T[self._row(t)]), self.tokens[t])

    def top(self, t: int, k: int) -> list:
        assert self.scores is not None and self.scores.top_ids_T_K is not None
        assert self.scores.top_logprobs_T_K is not None
        r = self._row(t)
        ids = self.scores.top_ids_T_K[r, :k].tolist()
        return [
            self._entry(lp, i)
            for lp, i in zip(self.scores.top_logprobs_T_K[r, :k].tolist(), ids, strict=True)
        ]

    def named(self, t: int, ids: list[int]) -> list:
        assert self.scores is not None and self.scores.score_logprobs_T_M is not None
        values = self.scores.score_logprobs_T_M[self._row(t), : len(ids)].tolist()
        return [self._entry(lp, i) for lp, i in zip(values, ids, strict=True)]

    def hidden(self, length: int, generated: int) -> list:
        """[input rows [L][D]] + one row per decode step: rows are positions 0.. (scored from prompt_len 1)."""
        assert self.scores is not None and self.scores.hidden_T_D is not None and self.offset == 1
        rows_N_D: np.ndarray = self.scores.hidden_T_D
        decode_steps = max(generated - 1, 0)
        return [rows_N_D[:length].tolist(), *rows_N_D[length : length + decode_steps].tolist()]
