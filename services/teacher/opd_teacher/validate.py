"""Checks of a score request against the served model's limits, shared by HTTP and gRPC.

Every error names the field and the limit, so a user can fix the request without reading our code.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from opd_client import schema
from opd_client.errors import InvalidRequest, TooManyTokens
from opd_teacher.backends.base import ScoreItem


def validate_score_request(
    req: schema.ScoreRequest, info: schema.ModelInfo, bos_token_id: int | None
) -> tuple[list[ScoreItem], int, float]:
    """(items, top_k, temperature) for a request that fits the model, else InvalidRequest/TooManyTokens."""
    if not req.sequences:
        raise InvalidRequest("sequences is empty; send at least 1 sequence", field="sequences")
    if req.return_hidden or req.hidden_dtype is not None:
        _check_hidden(req, info)
    low = 0 if req.return_hidden else 1  # top_k = 0: hidden states only, no logprobs
    if not low <= req.top_k <= info.max_top_k:
        why = " with return_hidden" if req.return_hidden else "; 0 only with return_hidden"
        raise InvalidRequest(
            f"top_k = {req.top_k} must be in [{low}, {info.max_top_k}] (max_top_k of model {info.name!r})"
            f"{why}",
            field="top_k",
        )
    if req.top_k == 0 and req.score_ids is not None:
        raise InvalidRequest(
            "score_ids need logprobs, and top_k = 0 computes none; use top_k >= 1, or compute them from the "
            "hidden states and the head",
            field="score_ids",
        )
    temperature = 1.0 if req.temperature is None else float(req.temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise InvalidRequest(
            f"temperature = {req.temperature} must be a finite number > 0", field="temperature"
        )
    if req.score_ids is not None and len(req.score_ids) != len(req.sequences):
        raise InvalidRequest(
            f"score_ids has {len(req.score_ids)} entries; it needs one per sequence ({len(req.sequences)})",
            field="score_ids",
        )

    items, total = [], 0
    for i, seq in enumerate(req.sequences):
        item = _item(i, seq, req.score_ids[i] if req.score_ids is not None else None, info, bos_token_id)
        total += item.forward_len
        items.append(item)
    if total > info.max_tokens:
        raise TooManyTokens(
            f"the request holds {total} tokens (teacher view, all sequences); the limit is "
            f"max_tokens = {info.max_tokens}: split it into smaller requests",
            field="sequences",
        )
    if req.return_hidden:
        items = [dataclasses.replace(item, return_hidden=True) for item in items]
        scored = sum(len(item.completion_ids) for item in items)
        itemsize = 4 if hidden_dtype(req, info) == "float32" else 2
        assert info.hidden_size and info.max_hidden_bytes, "_check_hidden refuses a teacher without them"
        size = scored * info.hidden_size * itemsize
        if size > info.max_hidden_bytes:
            raise TooManyTokens(
                f"the hidden states would be {size / 2**20:.0f} MiB ({scored} scored tokens × D = "
                f"{info.hidden_size} × {itemsize} bytes); the limit is max_hidden_bytes = {info.max_hidden_bytes >> 20} MiB "
                "per request: send fewer tokens per request (or hidden_dtype = bfloat16)",
                field="sequences",
            )
    return items, req.top_k, temperature


def hidden_dtype(req: schema.ScoreRequest, info: schema.ModelInfo) -> str | None:
    """The dtype the request's hidden states travel in (its own, else the model's), None without them."""
    if not req.return_hidden:
        return None
    return req.hidden_dtype or (info.dtype if info.dtype in schema.HIDDEN_DTYPES else "float32")


def _check_hidden(req: schema.ScoreRequest, info: schema.ModelInfo) -> None:
    if req.hidden_dtype is not None and req.hidden_dtype not in schema.HIDDEN_DTYPES:
        raise InvalidRequest(
            f"hidden_dtype = {req.hidden_dtype!r} must be one of {', '.join(schema.HIDDEN_DTYPES)} "
            f"(or unset: the model's dtype, {info.dtype})",
            field="hidden_dtype",
        )
    if not req.return_hidden:
        raise InvalidRequest(
            "hidden_dtype is only meaningful with return_hidden = true", field="hidden_dtype"
        )
    if not info.hidden_size or not info.head_sha256:
        raise InvalidRequest(
            f"teacher {info.name!r} gives no hidden states (its /v1/models record has no hidden_size: a "
            "black-box teacher, or one whose logits are not the head formula; see the service's log)",
            field="return_hidden",
        )


def _item(
    i: int,
    seq: schema.Sequence,
    score_rows: list[list[int]] | None,
    info: schema.ModelInfo,
    bos_token_id: int | None,
) -> ScoreItem:
    where = f"sequences[{i}]"
    n = len(seq.token_ids)
    if n == 0:
        raise InvalidRequest(
            f"{where}.token_ids is empty; it needs at least 1 token", field=f"{where}.token_ids"
        )
    if not 0 <= seq.prompt_len < n:
        raise InvalidRequest(
            f"{where}.prompt_len = {seq.prompt_len} must be in [0, {n}) (len(token_ids) = {n}), "
            "so at least one completion token is scored",
            field=f"{where}.prompt_len",
        )
    _check_ids(seq.token_ids, f"{where}.token_ids", info.vocab_size)
    context = seq.token_ids[: seq.prompt_len]
    if seq.teacher_prefix_ids is not None:
        _check_ids(seq.teacher_prefix_ids, f"{where}.teacher_prefix_ids", info.vocab_size)
        context = seq.teacher_prefix_ids
    if not context and bos_token_id is None:
        raise InvalidRequest(
            f"{where}: the teacher context is empty and model {info.name!r} has no BOS token to start "
            "from; use prompt_len >= 1 or teacher_prefix_ids",
            field=f"{where}.prompt_len",
        )
    completion = seq.token_ids[seq.prompt_len :]
    forward_len = max(len(context), 1) + len(completion)
    if forward_len > info.max_sequence_len:
        raise TooManyTokens(
            f"{where} is {forward_len} tokens long (teacher view); the limit is max_sequence_len = "
            f"{info.max_sequence_len}",
            field=f"{where}.token_ids",
        )
    score_ids = None if score_rows is None else _score_ids(i, score_rows, len(completion), info)
    return ScoreItem(context_ids=list(context), completion_ids=list(completion), score_ids_T_M=score_ids)


def _score_ids(i: int, rows: list[list[int]], num_completion: int, info: schema.ModelInfo) -> np.ndarray:
    field = f"score_ids[{i}]"
    if len(rows) != num_completion:
        raise InvalidRequest(
            f"{field} has {len(rows)} rows; it needs one per completion position "
            f"({num_completion} = len(token_ids) - prompt_len)",
            field=field,
        )
    width = len(rows[0])
    if not 1 <= width <= info.max_top_k or any(len(r) != width for r in rows):
        raise InvalidRequest(
            f"{field} rows must all have the same length M in [1, {info.max_top_k}] (max_top_k); "
            f"got lengths {sorted({len(r) for r in rows})}",
            field=field,
        )
    array = np.asarray(rows, dtype=np.int64)
    bad = np.argwhere((array < 0) | (array >= info.vocab_size))
    if len(bad):
        t, m = bad[0]
        raise InvalidRequest(
            f"{field}[{t}][{m}] = {array[t, m]} is outside the vocabulary [0, {info.vocab_size})",
            field=f"{field}[{t}][{m}]",
        )
    return array


def _check_ids(ids: list[int], field: str, vocab_size: int) -> None:
    for j, token in enumerate(ids):
        if not 0 <= token < vocab_size:
            raise InvalidRequest(
                f"{field}[{j}] = {token} is outside the vocabulary [0, {vocab_size})", field=f"{field}[{j}]"
            )
