"""Logprobs in the shapes OpenAI and vLLM clients read (legacy completions, chat, vLLM prompt_logprobs).

Shapes as in vllm/entrypoints/openai (CompletionLogProbs, ChatCompletionLogProbs, Logprob) and
openai.types (Completion, ChatCompletion):

- completions `logprobs`: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}; a prompt's first
  token has no logprob (null, null). `top_logprobs[t]` maps token text to logprob for the `logprobs` most
  likely tokens plus the actual one (so up to logprobs + 1 entries, as OpenAI documents). Tokens whose texts
  coincide share one key; the more likely keeps it, so max(values) is always the top-1 logprob.
- vLLM `prompt_logprobs`: per prompt position null (the first) or {token_id: {"logprob", "rank",
  "decoded_token"}}: the actual token first, then the top-k. rank = 1 + the number of vocabulary entries with
  a strictly larger logprob (vLLM counts ">=", which differs only on exact ties).
- chat `logprobs.content`: [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
  top_logprobs being the most likely tokens in descending order (as OpenAI; vLLM puts the sampled one first).
Logprobs are floored at -9999.0, as vLLM does for -inf, so every body is valid JSON.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

LOGPROB_FLOOR = -9999.0


def clamp(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


class TokenText:
    """Token id -> the text shown for it (each id decoded alone), decoded in batches and remembered."""

    def __init__(self, backend, as_ids: bool = False):
        self.backend = backend
        self.as_ids = as_ids  # vLLM's return_tokens_as_token_ids: "token_id:<id>"
        self._text: dict[int, str] = {}

    def load(self, ids: Iterable[int]) -> None:
        missing = sorted({i for i in ids if i not in self._text})
        if missing:
            self._text.update(zip(missing, self.backend.token_strings(missing), strict=True))

    def decoded(self, token_id: int) -> str:
        if token_id not in self._text:
            self.load([token_id])
        return self._text[token_id]

    def __call__(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.decoded(token_id)


@dataclass
class Rows:
    """Per token of a sequence: its logprob (None: a prompt's first token), top ids/logprobs, rank."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)  # [T][K] descending, [] where logprobs is None
    top_logprobs: list[list[float]] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)

    def __add__(self, other: Rows) -> Rows:
        return Rows(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))

    def all_ids(self, top_n: int) -> Iterable[int]:
        yield from self.token_ids
        for ids in self.top_ids:
            yield from ids[:top_n]


def prompt_rows(prompt_ids: list[int], scores) -> Rows:
    """A prompt's rows from its /v1/score result (token_ids = prompt, prompt_len = 1), None if 1 token."""
    rows = Rows([prompt_ids[0]], [None], [[]], [[]], [None])
    if scores is None:
        return rows
    ranks = scores.token_rank_T.tolist() if getattr(scores, "token_rank_T", None) is not None else None
    return rows + Rows(
        list(prompt_ids[1:]),
        scores.token_logprobs_T.tolist(),
        scores.top_ids_T_K.tolist(),
        scores.top_logprobs_T_K.tolist(),
        ranks or [None] * (len(prompt_ids) - 1),
    )


def sample_rows(sample) -> Rows:
    """A generated sample's rows (backends.generate.Sample)."""
    n = len(sample.token_ids)
    return Rows(sample.token_ids, sample.token_logprobs, sample.top_ids, sample.top_logprobs, [None] * n)


def completion_logprobs(rows: Rows, top_n: int, text: TokenText) -> dict:
    """OpenAI legacy completions logprobs (vLLM's text_offset: cumulative token text lengths from 0)."""
    text.load(rows.all_ids(top_n))
    tokens = [text(t) for t in rows.token_ids]
    token_logprobs, top_logprobs, text_offset, offset = [], [], [], 0
    for t, token in enumerate(tokens):
        lp = rows.logprobs[t]
        token_logprobs.append(None if lp is None else clamp(lp))
        top_logprobs.append(None if lp is None else _top_dict(rows, t, top_n, token, lp, text))
        text_offset.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def _top_dict(
    rows: Rows, t: int, top_n: int, token: str, token_logprob: float, text: TokenText
) -> dict[str, float]:
    out: dict[str, float] = {}
    for token_id, lp in zip(rows.top_ids[t][:top_n], rows.top_logprobs[t][:top_n], strict=True):
        out.setdefault(text(token_id), clamp(lp))
    out.setdefault(token, clamp(token_logprob))
    return out


def prompt_logprobs(rows: Rows, k: int, text: TokenText) -> list[dict | None]:
    """vLLM prompt_logprobs for a prompt's rows."""
    text.load(rows.all_ids(k))
    out: list[dict | None] = []
    for t, token_id in enumerate(rows.token_ids):
        token_logprob = rows.logprobs[t]
        if token_logprob is None:
            out.append(None)
            continue
        entry = {str(token_id): _logprob(token_logprob, rows.ranks[t], text.decoded(token_id))}
        top = rows.top_logprobs[t][:k]
        rank = 0
        for j, (top_id, lp) in enumerate(zip(rows.top_ids[t][:k], top, strict=True)):
            if j == 0 or lp < top[j - 1]:  # ties share the better rank: 1 + the count of larger logprobs
                rank = j + 1
            entry.setdefault(str(top_id), _logprob(lp, rank, text.decoded(top_id)))
        out.append(entry)
    return out


def _logprob(logprob: float, rank: int | None, decoded: str) -> dict:
    return {"logprob": clamp(logprob), "rank": rank, "decoded_token": decoded}


def chat_logprobs(rows: Rows, top_n: int, text: TokenText) -> dict:
    """OpenAI chat `choices[i].logprobs` for a sample's rows."""
    text.load(rows.all_ids(top_n))
    content = []
    for t, token_id in enumerate(rows.token_ids):
        top = [
            _chat_entry(text(i), lp)
            for i, lp in zip(rows.top_ids[t][:top_n], rows.top_logprobs[t][:top_n], strict=True)
        ]
        token_logprob = rows.logprobs[t]
        assert token_logprob is not None, "every generated token has its logprob"
        content.append({**_chat_entry(text(token_id), token_logprob), "top_logprobs": top})
    return {"content": content, "refusal": None}


def _chat_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": clamp(logprob), "bytes": list(token.encode("utf-8", errors="replace"))}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
