"""Teacher-aligned prompt selection, after Li et al. 2026, *Rethinking On-Policy Distillation of Large
Language Models: Phenomenology, Mechanism, and Recipe* (arXiv 2604.13016), which proposes it, with an
off-policy cold start, as a practical way "to recover failing OPD", having found that OPD succeeds where
student and teacher "share compatible thinking patterns" and the student's visited states concentrate
their probability on a small token set both share. How the paper selects its prompts could not be read;
our reading measures that compatibility directly, per prompt, before training:

    a_i = (1/T_i) Σ_t log p(x_t | x_<t)   over one seeded answer x of the starting student to prompt i
                                           (`prompt_selection_tokens` long),

and trains on the ⌈f·N⌉ prompts with the largest a_i (f = `prompt_selection_fraction`; ties keep the
earlier prompt), i.e. where the teacher already finds the student's own answers most plausible. The
selection is made once, from the starting weights, so a resumed run selects the same prompts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from opd_student.prompts import Prompt
from opd_student.rollout_factory import RolloutFactory
from opd_student.rollouts import row_seed
from opd_student.student_model import Student
from opd_student.teacher_link import TeacherLink

_STREAM = 11  # row_seed's second key for the selection's answers
_BATCH = 16  # prompts sampled at once


def top_fraction_indices(scores_N: list[float], fraction: float) -> list[int]:
    """The ⌈f·N⌉ indices of the largest scores (ties: the earlier), in their original order."""
    keep = max(1, math.ceil(fraction * len(scores_N)))
    order = sorted(range(len(scores_N)), key=lambda i: (-scores_N[i], i))
    return sorted(order[:keep])


def select_prompts(
    cfg, prompts: list[Prompt], student: Student, link: TeacherLink, factory: RolloutFactory, say: Callable
) -> list[Prompt]:
    """The training prompts a run uses: all of them, or the teacher-aligned share (module docstring)."""
    if cfg.prompt_selection_fraction >= 1:
        return prompts
    alignment: list[float] = []
    tokens = 0
    for start in range(0, len(prompts), _BATCH):
        batch = prompts[start : start + _BATCH]
        ids = [factory.prompt_ids(p) for p in batch]
        seeds = [row_seed(cfg.seed, _STREAM, start + j) for j in range(len(batch))]
        completions = student.sample(ids, 1, cfg.prompt_selection_tokens, cfg.temperature, row_seeds=seeds)
        rollouts = factory.rollouts(batch, ids, completions)
        for scores in link.collect(link.submit(rollouts, 1)):
            assert scores.token_logprobs_T is not None
            alignment.append(float(np.mean(scores.token_logprobs_T)) if scores.num_tokens else -math.inf)
            tokens += scores.num_tokens
    kept = top_fraction_indices(alignment, cfg.prompt_selection_fraction)
    floor = min(alignment[i] for i in kept)
    say(
        f"teacher-aligned prompt selection: {len(kept)} of {len(prompts)} prompts kept (mean teacher logprob "
        f"of the student's answer >= {floor:.3f}; {tokens} answer tokens scored)"
    )
    if student.world.is_main:
        record = {"kept": [prompts[i].id for i in kept], "alignment": alignment, "teacher_tokens": tokens}
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "prompt_selection.json").write_text(json.dumps(record, indent=1) + "\n")
    return [prompts[i] for i in kept]
