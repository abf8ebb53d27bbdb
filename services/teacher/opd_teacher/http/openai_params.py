"""Checks of OpenAI-/vLLM-style requests against the served model, and what they ask the engine to do.

Every error names the request field (OpenAI's `error.param`) and the limit, like validate.py does for
/v1/score; fields this server does not implement are refused here when their value would change the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from opd_client import openai_schema as oai
from opd_client.errors import InvalidRequest, TooManyTokens
from opd_client.schema import ModelInfo
from opd_teacher.backends.generate import SamplingParams

MAX_N = 128  # samples per prompt


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str  # as given, or the ids decoded (what echo shows)


def reject_unsupported(req: oai.CompletionRequest | oai.ChatCompletionRequest) -> None:
    """A 400 naming the first field whose value this server cannot honour."""
    if req.stream:
        _refuse(
            "stream", "stream = true is not supported: answers come as one JSON body; send stream = false"
        )
    if req.stream_options is not None:
        _refuse("stream_options", "stream_options needs stream = true, which is not supported; leave it out")
    if req.logit_bias:
        _refuse("logit_bias", "logit_bias is not supported (only null or {})")
    for name, neutral in (
        ("presence_penalty", 0),
        ("frequency_penalty", 0),
        ("repetition_penalty", 1),
        ("min_tokens", 0),
    ):
        value = getattr(req, name)
        if value is not None and value != neutral:
            _refuse(name, f"{name} = {value} is not supported (only null or {neutral})")
    if isinstance(req, oai.CompletionRequest):
        if req.best_of is not None and req.best_of not in (1, req.n or 1):
            _refuse("best_of", f"best_of = {req.best_of} is not supported (only null, 1 or n)")
        if req.suffix:
            _refuse("suffix", "suffix is not supported (only null or empty)")
        return
    if req.response_format is not None and req.response_format != {"type": "text"}:
        _refuse("response_format", 'response_format is not supported (only null or {"type": "text"})')
    if req.tools:
        _refuse("tools", "tools are not supported (only null or [])")
    if req.tool_choice not in (None, "none", "auto"):
        _refuse("tool_choice", 'tool_choice is not supported (only null, "none", or "auto" without tools)')


def _refuse(field: str, message: str) -> None:
    raise InvalidRequest(message, field=field)


def completion_prompts(req: oai.CompletionRequest, backend) -> list[Prompt]:
    """The request's prompts as token ids; text prompts tokenized as vLLM does (add_special_tokens)."""
    vocab = backend.info.vocab_size
    prompt = req.prompt
    if isinstance(prompt, str):
        return [_text_prompt(prompt, "prompt", req.add_special_tokens, backend)]
    if not prompt:
        _refuse("prompt", "prompt is empty; send a string, a list of strings or token ids")
    if isinstance(prompt[0], int):
        return [_id_prompt(prompt, "prompt", vocab, backend)]
    if isinstance(prompt[0], str):
        return [
            _text_prompt(p, f"prompt[{i}]", req.add_special_tokens, backend) for i, p in enumerate(prompt)
        ]
    return [_id_prompt(p, f"prompt[{i}]", vocab, backend) for i, p in enumerate(prompt)]


def _text_prompt(text: str, field: str, add_special_tokens: bool, backend) -> Prompt:
    ids = backend.tokenize_text(text, add_special_tokens=add_special_tokens) if text else []
    if not ids:
        _refuse(field, f"{field} is empty; it needs at least 1 token")
    return Prompt(ids=ids, text=text)


def _id_prompt(ids: list[int], field: str, vocab: int, backend) -> Prompt:
    if not ids:
        _refuse(field, f"{field} is empty; it needs at least 1 token")
    for j, token in enumerate(ids):
        if not 0 <= token < vocab:
            _refuse(f"{field}[{j}]", f"{field}[{j}] = {token} is outside the vocabulary [0, {vocab})")
    return Prompt(ids=list(ids), text=backend.decode(ids, skip_special_tokens=False))


def top_count(field: str, value: int | None, info: ModelInfo) -> int | None:
    """A logprobs-style count in [0, max_top_k]; -1 (vLLM) means the whole vocabulary."""
    if value is None:
        return None
    count = info.vocab_size if value == -1 else value
    if not 0 <= count <= info.max_top_k:
        _refuse(
            field,
            f"{field} = {value} must be in [0, {info.max_top_k}] (max_top_k of model {info.name!r}; "
            "-1 asks for the whole vocabulary where max_top_k allows it)",
        )
    return count


def check_lengths(prompts: list[Prompt], max_tokens: int, n: int, info: ModelInfo, field: str) -> None:
    """Each prompt + max_tokens fits max_sequence_len; all prompts and samples fit max_tokens (413)."""
    for i, p in enumerate(prompts):
        if len(p.ids) + max_tokens > info.max_sequence_len:
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            raise TooManyTokens(
                f"{where} has {len(p.ids)} tokens and {field} = {max_tokens}: {len(p.ids) + max_tokens} is "
                f"more than max_sequence_len = {info.max_sequence_len} of model {info.name!r}",
                field=field if max_tokens else "prompt",
            )
    total = sum(len(p.ids) + n * max_tokens for p in prompts)
    if total > info.max_tokens:
        raise TooManyTokens(
            f"the request holds {total} tokens (prompts + n x {field}); the limit is max_tokens = "
            f"{info.max_tokens} per request: split it into smaller requests",
            field="prompt",
        )


def samples_per_prompt(req: oai.CompletionRequest | oai.ChatCompletionRequest) -> int:
    n = 1 if req.n is None else req.n
    if not 1 <= n <= MAX_N:
        _refuse("n", f"n = {n} must be in [1, {MAX_N}]")
    return n


def check_generation_tokens(field: str, max_tokens: int, limit: int) -> None:
    """max_tokens (per sample) within the server's --max-generation-tokens."""
    if max_tokens > limit:
        _refuse(
            field,
            f"{field} = {max_tokens} is more than max_generation_tokens = {limit}, the most tokens one sample "
            "may generate on this server (opd serve-teacher --max-generation-tokens)",
        )


def _float(value: float | int | None, default: float) -> float:
    """A JSON number as a float; an integer beyond float's range becomes inf (refused by the range checks)."""
    if value is None:
        return default
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def sampling_params(
    req: oai.CompletionRequest | oai.ChatCompletionRequest, max_tokens: int, logprobs: int, info: ModelInfo
) -> SamplingParams:
    """The sampler's parameters; each range is what sample_next can draw from without NaN (NaN and inf are
    outside every range)."""
    temperature = _float(req.temperature, 1.0)
    if not (math.isfinite(temperature) and temperature >= 0):
        _refuse("temperature", f"temperature = {req.temperature} must be a finite number >= 0 (0: greedy)")
    top_p = _float(req.top_p, 1.0)
    if not 0 < top_p <= 1:
        _refuse("top_p", f"top_p = {req.top_p} must be in (0, 1] (a tiny top_p keeps the most likely token)")
    top_k = 0 if req.top_k in (None, -1) else req.top_k
    if top_k < 0:
        _refuse("top_k", f"top_k = {req.top_k} must be >= 1, or 0 / -1 for the whole vocabulary")
    min_p = _float(req.min_p, 0.0)
    if not 0 <= min_p <= 1:
        _refuse("min_p", f"min_p = {req.min_p} must be in [0, 1]")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    stop_ids = tuple(req.stop_token_ids or ())
    for j, token in enumerate(stop_ids):
        if not 0 <= token < info.vocab_size:
            _refuse(
                f"stop_token_ids[{j}]",
                f"stop_token_ids[{j}] = {token} is outside the vocabulary [0, {info.vocab_size})",
            )
    return SamplingParams(
        max_tokens=max_tokens,
        n=samples_per_prompt(req),
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        seed=req.seed,
        stop=tuple(s for s in stop if s),
        stop_token_ids=stop_ids,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
    )


def chat_messages(req: oai.ChatCompletionRequest) -> list[dict]:
    """Messages as the chat template takes them: role and text (text parts joined)."""
    if not req.messages:
        _refuse("messages", "messages is empty; send at least 1 message")
    out = []
    for m in req.messages:
        content = (
            m.content
            if isinstance(m.content, str) or m.content is None
            else "".join(p.text for p in m.content)
        )
        out.append({"role": m.role, "content": content or ""})
    return out
