"""The TrainerCallback the TRL workers share: per-step wall time and teacher tokens into steps.jsonl, and
a snapshot of the student at each evaluation point.

Evaluation runs afterwards on the snapshots (snapshot_eval.py), with the same evaluate() `opd train` calls
in-process: under TRL's bf16 setting accelerate wraps model.forward in autocast, so evaluating inside the
trainer would not be the fp32 evaluation the opd arms get. The snapshot is written after the step's time is
taken, and the next step's clock starts after it, so neither evaluation nor snapshotting is in time_s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

from opd_bench.compare.records import STEPS, append_jsonl, snapshot_dir


class StepRecorder(TrainerCallback):
    def __init__(
        self, arm_dir: Path, total_steps: int, snapshot_steps: set[int], teacher_tokens: Callable[[int], int]
    ):
        """teacher_tokens(step): the teacher tokens used up to and including that step (cumulative)."""
        self.arm_dir = arm_dir
        self.total_steps = total_steps
        self.snapshot_steps = snapshot_steps
        self.teacher_tokens = teacher_tokens
        self._clock = 0.0
        self._tokens_before = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._clock = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        elapsed = time.perf_counter() - self._clock
        step = state.global_step
        tokens = self.teacher_tokens(step)
        append_jsonl(
            self.arm_dir / STEPS,
            {"step": step, "time_s": elapsed, "teacher_tokens": tokens - self._tokens_before},
        )
        self._tokens_before = tokens
        print(f"[compare] step {step}/{self.total_steps} {elapsed:.1f} s", flush=True)
        if step in self.snapshot_steps:
            # fp32 master weights, as the trainer holds them (autocast does not touch the parameters)
            model.save_pretrained(snapshot_dir(self.arm_dir, step))
        self._clock = time.perf_counter()
