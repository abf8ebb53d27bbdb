"""SGLang's native `POST /generate` body, checked and cut into one `Prompt` per prompt.

Field names, defaults and batch rules are SGLang's (v0.5.23, the PyPI wheel `sglang==0.5.23`:
`srt/managers/io_struct.py` GenerateReqInput and its `_normalize_*`, `srt/sampling/sampling_params.py`,
`srt/managers/scheduler.py` for `logprob_start_len`):

- `text` (a string or a list: a batch) or `input_ids` (a list of ids, or a list of lists: a batch);
- per-prompt fields take one value for all prompts or a list with one per prompt: `sampling_params`,
  `return_logprob`, `logprob_start_len`, `top_logprobs_num`, `return_hidden_states`, `rid`;
  `token_ids_logprob` is one list of ids for all prompts or a list of such lists;
- `logprob_start_len` -1 (the default) gives no input logprobs; s in [0, len] gives entries for the input
  tokens from s on; more than the prompt's length is an error;
- `sampling_params.max_new_tokens` defaults to 128, as SGLang's; 0 only scores.

opd's additions: `model` (in the body or as `?model=` in the URL) picks a teacher by name. Every error is an
InvalidRequest naming the field (`input_ids[1][3]`, `sampling_params.top_p`); fields SGLang has that would
change the answer here (streaming, images, LoRA, penalties, grammars) are refused when set, and unknown
fields are refused rather than ignored, so a typo never falls back to a default silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from opd_client.errors import InvalidRequest, TooManyTokens
from opd_client.schema import ModelInfo
from opd_teacher.backends.generate import SamplingParams

SGLANG_VERSION = "0.5.23"
DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's SamplingParams.max_new_tokens

# Accepted and without effect here (bookkeeping, routing hints for SGLang's own scheduler).
_NO_OP_FIELDS = {"log_metrics", "custom_labels", "priority", "routing_key", "extra_key", "session_id"}
# SGLang fields whose use this server cannot honour: only their neutral value (null, false, [] or {}) passes.
_UNSUPPORTED_FIELDS = (
    "input_embeds",
    "image_data",
    "video_data",
    "audio_data",
    "lora_path",
    "session_params",
    "custom_logit_processor",
    "return_routed_experts",
    "return_flat_raw_top_logprobs",
    "return_entropy",
    "return_sampling_mask",
    "bootstrap_host",
    "bootstrap_port",
    "bootstrap_room",
)
_KNOWN_FIELDS = {
    "model",
    "rid",
    "text",
    "input_ids",
    "sampling_params",
    "return_logprob",
    "logprob_start_len",
    "top_logprobs_num",
    "token_ids_logprob",
    "return_hidden_states",
    "return_text_in_logprobs",
    "return_prompt_token_ids",
    "stream",
    *_NO_OP_FIELDS,
    *_UNSUPPORTED_FIELDS,
}
# sampling_params keys that are honoured, and the neutral value of those that are not.
_SAMPLING_KEYS = {
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "no_stop_trim",
    "sampling_seed",
    "stream_interval",
    "detokenize",  # vLLM's name, which verl's teacher request carries: text is not used here
    "n",
}
_SAMPLING_NEUTRAL: dict[str, Any] = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "repetition_penalty": 1,
    "min_new_tokens": 0,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "stop_regex": None,
    "logit_bias": None,
    "custom_params": None,
    "beam_width": None,
    "watermark": None,
}


@dataclass(frozen=True)
class Prompt:
    """One prompt of a /generate request, resolved: what to generate and which logprobs to return."""

    ids: list[int]  # L >= 1 input ids
    rid: str | None
    return_logprob: bool
    start: int  # first input token with an entry in input_token_logprobs, in [0, L]; L: none
    top_n: int  # top_logprobs_num
    token_ids: list[int] | None  # token_ids_logprob
    hidden: bool  # return_hidden_states
    sampling: SamplingParams | None  # None: max_new_tokens = 0, score only
    return_prompt_ids: bool = False  # return_prompt_token_ids: the answer repeats the input ids


def refuse(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, field=field)


def parse_prompts(body: Any, info: ModelInfo, tokenize, generation_limit: int) -> tuple[list[Prompt], bool]:
    """(prompts, is_batch) for a JSON body, or InvalidRequest / TooManyTokens naming the field.

    `tokenize(text)` gives a text's ids (SGLang tokenizes with the tokenizer's special tokens)."""
    if not isinstance(body, dict):
        raise refuse("body", "the body must be a JSON object (SGLang's GenerateReqInput)")
    _check_fields(body)
    ids_P, batch = _inputs(body, info, tokenize)
    n = len(ids_P)
    sampling_P = _per_prompt(body, "sampling_params", n, batch, dict, {})
    return_logprob_P = _per_prompt(body, "return_logprob", n, batch, bool, False)
    start_P = _per_prompt(body, "logprob_start_len", n, batch, int, -1)
    top_n_P = _per_prompt(body, "top_logprobs_num", n, batch, int, 0)
    hidden_P = _per_prompt(body, "return_hidden_states", n, batch, bool, False)
    rid_P = _per_prompt(body, "rid", n, batch, str, None)
    token_ids_P = _token_ids_logprob(body.get("token_ids_logprob"), n, info)
    prompts = []
    for i, ids in enumerate(ids_P):
        where = f"[{i}]" if batch else ""
        top_n = top_n_P[i]
        if not 0 <= top_n <= info.max_top_k:
            raise refuse(
                f"top_logprobs_num{where}",
                f"top_logprobs_num = {top_n} must be in [0, {info.max_top_k}] (max_top_k of model {info.name!r})",
            )
        if hidden_P[i] and not info.hidden_size:
            raise refuse(
                f"return_hidden_states{where}",
                f"teacher {info.name!r} gives no hidden states (its /v1/models record has no hidden_size)",
            )
        prompts.append(
            Prompt(
                ids=ids,
                rid=rid_P[i],
                return_logprob=return_logprob_P[i],
                start=_start(start_P[i], len(ids), f"logprob_start_len{where}"),
                top_n=top_n,
                token_ids=token_ids_P[i],
                hidden=hidden_P[i],
                return_prompt_ids=body.get("return_prompt_token_ids") is True,
                sampling=_sampling(
                    sampling_P[i], f"sampling_params{where}", len(ids), info, generation_limit
                ),
            )
        )
    return prompts, batch


def _check_fields(body: dict) -> None:
    for key, value in body.items():
        if key not in _KNOWN_FIELDS:
            raise refuse(
                key, f"unknown field {key!r} (SGLang {SGLANG_VERSION}'s GenerateReqInput, as served by opd)"
            )
        if key in _UNSUPPORTED_FIELDS and value not in (None, False, [], {}):
            raise refuse(key, f"{key} is not supported by opd's /generate (only null)")
    if body.get("stream"):
        raise refuse("stream", "stream = true is not supported: answers come as one JSON body")
    for key in ("return_text_in_logprobs", "return_prompt_token_ids"):
        if body.get(key) not in (None, True, False):
            raise refuse(key, f"{key} must be a boolean")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise refuse("model", "model must be a string: the name of a served teacher")


def _inputs(body: dict, info: ModelInfo, tokenize) -> tuple[list[list[int]], bool]:
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise refuse("input_ids", "send exactly one of text and input_ids")
    if text is not None:
        batch = isinstance(text, list)
        texts = text if batch else [text]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise refuse("text", "text must be a string or a non-empty list of strings")
        ids_P = [tokenize(t) for t in texts]
        for i, ids in enumerate(ids_P):
            if not ids:
                raise refuse(f"text[{i}]" if batch else "text", "the text holds no tokens")
        return ids_P, batch
    if not isinstance(input_ids, list) or not input_ids:
        raise refuse("input_ids", "input_ids must be a non-empty list of token ids, or a list of such lists")
    batch = isinstance(input_ids[0], list)
    ids_P = input_ids if batch else [input_ids]
    for i, ids in enumerate(ids_P):
        where = f"input_ids[{i}]" if batch else "input_ids"
        if not isinstance(ids, list) or not ids:
            raise refuse(where, f"{where} must be a non-empty list of token ids")
        for j, token in enumerate(ids):
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < info.vocab_size:
                raise refuse(
                    f"{where}[{j}]",
                    f"{where}[{j}] = {token!r} is outside the vocabulary [0, {info.vocab_size})",
                )
        if len(ids) > info.max_sequence_len:
            raise TooManyTokens(
                f"{where} holds {len(ids)} tokens; the limit is max_sequence_len = {info.max_sequence_len}",
                field=where,
            )
    return ids_P, batch


def _per_prompt(body: dict, key: str, n: int, batch: bool, kind: type, default: Any) -> list:
    """SGLang's normalize_param: one value for every prompt, or (in a batch) a list with one per prompt."""
    value = body.get(key)
    if value is None:
        return [default] * n
    values = value if isinstance(value, list) and kind is not list else [value] * n
    if isinstance(value, list) and len(values) != n:
        raise refuse(key, f"{key} has {len(values)} entries; the batch has {n} prompts")
    for i, v in enumerate(values):
        ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
        if not ok and not (v is None and default is None):
            where = f"{key}[{i}]" if isinstance(value, list) else key
            raise refuse(where, f"{where} = {v!r} must be a {kind.__name__}")
    return [default if v is None else v for v in values]


def _token_ids_logprob(value: Any, n: int, info: ModelInfo) -> list[list[int] | None]:
    if not value:
        return [None] * n
    if not isinstance(value, list):
        raise refuse("token_ids_logprob", "token_ids_logprob must be a list of ids, or one list per prompt")
    rows = value if isinstance(value[0], list) else [value] * n
    if len(rows) != n:
        raise refuse(
            "token_ids_logprob", f"token_ids_logprob has {len(rows)} lists; the batch has {n} prompts"
        )
    out: list[list[int] | None] = []
    for i, row in enumerate(rows):
        where = f"token_ids_logprob[{i}]" if isinstance(value[0], list) else "token_ids_logprob"
        if not isinstance(row, list) or len(row) > info.max_top_k:
            raise refuse(where, f"{where} must be a list of at most {info.max_top_k} ids (max_top_k)")
        for j, token in enumerate(row):
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < info.vocab_size:
                raise refuse(
                    f"{where}[{j}]",
                    f"token_ids_logprob contains out-of-vocabulary token id {token!r}; valid range is "
                    f"[0, {info.vocab_size})",
                )
        out.append(row or None)
    return out


def _start(value: int, length: int, field: str) -> int:
    """SGLang's scheduler: -1 gives no input logprobs (start = L); beyond the prompt is an error."""
    if value == -1:
        return length
    if not 0 <= value <= length:
        raise refuse(
            field,
            f"{field} = {value} must be -1 (no input logprobs) or in [0, {length}] (the number of input tokens)",
        )
    return value


def _sampling(params: dict, field: str, length: int, info: ModelInfo, limit: int) -> SamplingParams | None:
    for key, value in params.items():
        if key in _SAMPLING_NEUTRAL:
            neutral = _SAMPLING_NEUTRAL[key]
            if value is not None and value != neutral and value != {}:
                raise refuse(
                    f"{field}.{key}", f"{field}.{key} = {value!r} is not supported (only {neutral!r})"
                )
        elif key not in _SAMPLING_KEYS:
            raise refuse(f"{field}.{key}", f"unknown sampling parameter {key!r}")
    max_new = _number(params, "max_new_tokens", field, int, DEFAULT_MAX_NEW_TOKENS)
    if not 0 <= max_new <= limit:
        raise refuse(
            f"{field}.max_new_tokens",
            f"max_new_tokens = {max_new} must be in [0, {limit}] (0: score only; {limit}: this server's "
            "--max-generation-tokens)",
        )
    if length + max_new > info.max_sequence_len:
        raise TooManyTokens(
            f"the input has {length} tokens and max_new_tokens = {max_new}: more than max_sequence_len = "
            f"{info.max_sequence_len} of model {info.name!r}",
            field=f"{field}.max_new_tokens",
        )
    if _number(params, "n", field, int, 1) != 1:
        raise refuse(f"{field}.n", "n must be 1: send the prompt n times in a batch for n samples")
    temperature = _number(params, "temperature", field, float, 1.0)
    top_p = _number(params, "top_p", field, float, 1.0)
    top_k = _number(params, "top_k", field, int, -1)
    min_p = _number(params, "min_p", field, float, 0.0)
    # SGLang's SamplingParams.verify ranges, whose messages these follow.
    if not (math.isfinite(temperature) and temperature >= 0):
        raise refuse(
            f"{field}.temperature", f"temperature must be a non-negative finite number, got {temperature}"
        )
    if not 0 < top_p <= 1:
        raise refuse(f"{field}.top_p", f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= min_p <= 1:
        raise refuse(f"{field}.min_p", f"min_p must be in [0, 1], got {min_p}")
    if top_k != -1 and top_k < 1:
        raise refuse(f"{field}.top_k", f"top_k must be -1 (disable) or at least 1, got {top_k}")
    stop = params.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
        raise refuse(f"{field}.stop", "stop must be a string or a list of strings")
    stop_ids = params.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(
        isinstance(t, int) and 0 <= t < info.vocab_size for t in stop_ids
    ):
        raise refuse(f"{field}.stop_token_ids", f"stop_token_ids must be ids in [0, {info.vocab_size})")
    seed = params.get("sampling_seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise refuse(f"{field}.sampling_seed", "sampling_seed must be an integer")
    if max_new == 0:
        return None
    return SamplingParams(
        max_tokens=max_new,
        temperature=temperature,
        top_p=top_p,
        top_k=0 if top_k == -1 else top_k,
        min_p=min_p,
        seed=seed,
        stop=tuple(s for s in stop if s),
        stop_token_ids=tuple(stop_ids),
        ignore_eos=bool(params.get("ignore_eos", False)),
        skip_special_tokens=bool(params.get("skip_special_tokens", True)),
        include_stop_str_in_output=bool(params.get("no_stop_trim", False)),
    )


def _number(params: dict, key: str, field: str, kind: type, default: Any) -> Any:
    value = params.get(key)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (kind is int and not isinstance(value, int))
    ):
        raise refuse(
            f"{field}.{key}",
            f"{field}.{key} = {value!r} must be {'an integer' if kind is int else 'a number'}",
        )
    return kind(value)
