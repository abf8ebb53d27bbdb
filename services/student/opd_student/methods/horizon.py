"""TOPD and POPD: the rollout horizon, i.e. how many completion tokens the student may generate.

Zhang et al. 2026, "Are Full Rollouts Necessary for On-Policy Distillation?" (arXiv 2605.31490):
- TOPD (truncated OPD) trains on the first ρ·T tokens of every rollout, T = max_new_tokens;
- POPD (progressive OPD) lets the horizon grow on a schedule, H_k = min(T, H0 + ΔH·⌊k/Δk⌋), k = 0, 1, ...
  the index of the training step.

The trainer passes the horizon to generation as max_new_tokens, so the student stops there: the saving in
sampling, teacher scoring and the backward pass is real, not a mask applied after a full rollout. Both
can be set at once; the smaller horizon wins.
"""

from __future__ import annotations

import math


def truncated_horizon(max_new_tokens: int, ratio: float) -> int:
    """TOPD: ⌊ρ·T⌋ tokens, at least 1 (a tiny epsilon so 0.3·10 counts as 3, not 2.999…)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"horizon ratio ρ must be in (0, 1]; got {ratio}")
    return max(1, min(max_new_tokens, math.floor(ratio * max_new_tokens + 1e-9)))


def progressive_horizon(step_index: int, max_new_tokens: int, start: int, growth: int, every: int) -> int:
    """POPD: H_k = min(T, H0 + ΔH·⌊k/Δk⌋) for the step with 0-based index k."""
    if start < 1 or growth < 0 or every < 1 or step_index < 0:
        raise ValueError(
            f"POPD needs H0 >= 1, ΔH >= 0, Δk >= 1, k >= 0; got {start}, {growth}, {every}, {step_index}"
        )
    return min(max_new_tokens, start + growth * (step_index // every))


def rollout_horizon(
    step_index: int,
    max_new_tokens: int,
    ratio: float = 1.0,
    start: int = 0,
    growth: int = 0,
    every: int = 1,
) -> int:
    """The horizon of the rollouts trained at step index k: TOPD's ⌊ρ·T⌋ and, when start > 0, POPD's
    schedule; the smaller of the two. With the defaults (ρ = 1, no schedule) it is T."""
    horizon = truncated_horizon(max_new_tokens, ratio)
    if start > 0:
        horizon = min(horizon, progressive_horizon(step_index, max_new_tokens, start, growth, every))
    return horizon
