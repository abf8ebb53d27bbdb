"""Pure helpers the arms share: which prompts each step sees, where evaluation happens, and how the SFT
arm's teacher samples are cut to the teacher-token budget."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

from opd_student.prompts import Prompt, PromptStream


def prompt_schedule(
    prompts: list[Prompt], seed: int, steps: int, prompts_per_step: int
) -> list[list[Prompt]]:
    """The prompts of each step, in the order `opd train` draws them (PromptStream with the run's seed),
    so the TRL arms train on the same prompts in the same steps."""
    stream = PromptStream(prompts, seed=seed)
    return [stream.take(prompts_per_step) for _ in range(steps)]


def repeated_rows(schedule: list[list[Prompt]], samples_per_prompt: int) -> list[Prompt]:
    """One row per rollout: each prompt G times in a row. TRL's distillation trainers sample once per row,
    so G copies of a prompt in one generation batch are opd's G samples per prompt."""
    return [p for step in schedule for p in step for _ in range(samples_per_prompt)]


def eval_points(steps: int, eval_every: int) -> list[int]:
    """Step 0, every eval_every steps, and the last step (as `opd train --eval-every`)."""
    points = [0]
    if eval_every:
        points += list(range(eval_every, steps, eval_every))
    return points + [steps]


def fit_to_budget(
    samples: Iterable[tuple[list[int], list[int]]], budget: int
) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, completion_ids) pairs in order until the completions add up to `budget` tokens exactly:
    the last completion is cut short (granularity 1 token). Reads the iterable lazily, so it can be an
    endless generator that only produces what is needed."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0; got {budget}")
    out: list[tuple[list[int], list[int]]] = []
    total = 0
    it: Iterator[tuple[list[int], list[int]]] = iter(samples)
    while total < budget:
        try:
            prompt_ids, completion_ids = next(it)
        except StopIteration:
            raise ValueError(f"the samples ran out at {total} of {budget} tokens") from None
        if not completion_ids:
            continue
        take = completion_ids[: budget - total]
        out.append((prompt_ids, take))
        total += len(take)
    return out


def steps_for(num_sequences: int, per_step: int) -> int:
    """Optimizer steps of one pass over num_sequences at per_step sequences a step (the last may be short)."""
    return math.ceil(num_sequences / per_step)
