"""Which forwards one score() call runs: shared-prompt groups and plain micro-batches (pure python, no torch).

Trainers send G rollouts per prompt, so items in one call often share their teacher context. Such a group
runs its prompt once (batch 1, keeping the KV cache) and then its completions on top of that cache, in
chunks. Every other item goes through length-sorted micro-batches of whole sequences, as before.

Cost model, shared by both kinds of forward: a row costs its whole teacher view, context + completion
tokens, padded to the longest row of its forward, and one forward holds at most `max_batch_tokens` of that
(a single row larger than the budget runs alone). Charging a group's completion rows for the prompt they
attend to keeps the attention and the expanded KV of a chunk no larger than a plain batch of the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PrefixGroup:
    """Items with the same teacher context: its prompt runs once, the completions in chunks on its cache."""

    prompt_len: int
    chunks: list[list[int]]  # item indices; each chunk is one forward of completions

    @property
    def members(self) -> list[int]:
        return [i for chunk in self.chunks for i in chunk]


@dataclass(frozen=True)
class ScorePlan:
    groups: list[PrefixGroup]
    batches: list[list[int]]  # item indices of plain micro-batches (whole sequences, right padded)
    # Token positions each item makes the model run (unpadded): a plain item its whole teacher view, a group
    # member its completion minus the last token (its hidden state predicts nothing we score), and a group's
    # first member (in item order) also the prompt, computed once for all.
    forward_tokens_I: list[int] = field(default_factory=list)

    @property
    def forward_tokens(self) -> int:
        return sum(self.forward_tokens_I)


def plan_score(
    contexts: Sequence[tuple[int, ...]],
    completion_lens: Sequence[int],
    max_batch_tokens: int,
    prefix_reuse: bool = True,
) -> ScorePlan:
    """Split items (teacher contexts, BOS already substituted for an empty one) into groups and batches."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    if prefix_reuse:
        for i, context in enumerate(contexts):
            by_context.setdefault(context, []).append(i)
    shared = [members for members in by_context.values() if len(members) >= 2]
    in_group = {i for members in shared for i in members}

    forward_tokens_I = [len(contexts[i]) + completion_lens[i] for i in range(len(contexts))]
    groups = []
    for members in shared:
        prompt_len = len(contexts[members[0]])
        for i in members:
            forward_tokens_I[i] = completion_lens[i] - 1
        forward_tokens_I[members[0]] += prompt_len
        cost = {i: prompt_len + completion_lens[i] for i in members}
        groups.append(PrefixGroup(prompt_len, _pack(members, cost, max_batch_tokens)))

    plain = [i for i in range(len(contexts)) if i not in in_group]
    batches = _pack(plain, {i: len(contexts[i]) + completion_lens[i] for i in plain}, max_batch_tokens)
    return ScorePlan(groups=groups, batches=batches, forward_tokens_I=forward_tokens_I)


def _pack(indices: list[int], cost: dict[int, int], max_batch_tokens: int) -> list[list[int]]:
    """Indices sorted by cost so padding stays small, cut where the padded cost would pass the budget."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i in sorted(indices, key=cost.__getitem__):  # stable: equal costs keep the items' order
        longest = cost[i]  # sorted ascending: the newest is the longest
        if current and longest * (len(current) + 1) > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches
