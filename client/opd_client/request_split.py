"""Cut a list of sequences into score requests that each fit the teacher's per-request limits.

A request's limits are in its model's /v1/models record: `max_tokens` (teacher-view tokens summed over the
sequences) and, with `return_hidden`, `max_hidden_bytes` (scored tokens × hidden_size × 2 or 4 bytes). A
trainer that sends a whole step at once would otherwise be refused (TooManyTokens) as soon as its batch
outgrows them; splitting on the client keeps requests as large as allowed, so the service still batches.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

from opd_client.schema import ModelInfo

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def teacher_view_len(token_ids: Seq[int], prompt_len: int, teacher_prefix_ids: Seq[int] | None) -> int:
    """Tokens the teacher runs for one sequence: its context (the prompt, or teacher_prefix_ids; at least a
    BOS) and the completion, as the service counts them against max_tokens."""
    context = prompt_len if teacher_prefix_ids is None else len(teacher_prefix_ids)
    return max(context, 1) + len(token_ids) - prompt_len


def split_requests(
    sizes: Seq[tuple[int, int]],
    info: ModelInfo,
    return_hidden: bool = False,
    hidden_dtype: str | None = None,
) -> list[list[int]]:
    """Index groups, in order, each within the limits; `sizes` holds (teacher-view tokens, scored tokens)
    per sequence. A sequence too large on its own gets a group of its own: the service's error for it then
    names the limit."""
    bytes_per_scored = 0
    if return_hidden and info.hidden_size and info.max_hidden_bytes:
        dtype = hidden_dtype or (info.dtype if info.dtype in ITEMSIZE else "float32")
        bytes_per_scored = info.hidden_size * ITEMSIZE[dtype]
    groups: list[list[int]] = []
    tokens = hidden = 0
    for i, (forward_len, scored) in enumerate(sizes):
        size = scored * bytes_per_scored
        fits = tokens + forward_len <= info.max_tokens and (
            not bytes_per_scored or hidden + size <= (info.max_hidden_bytes or 0)
        )
        if not groups or not fits:
            groups.append([])
            tokens = hidden = 0
        groups[-1].append(i)
        tokens += forward_len
        hidden += size
    return groups
