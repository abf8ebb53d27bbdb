"""What a teacher signal is: the one interface through which the training loop meets a teacher.

A signal is one kind of teacher feedback and everything that follows from it. Per step the loop calls

    request  = signal.request(rollouts)          send the step's rollouts to the teacher (pipelined)
    feedback = signal.collect(request)           wait for the answers (outages are waited out)
    step     = signal.step_loss(rollouts, feedback)
    accumulate_gradients(step.sequences, ..., step.normaliser, step.per_token_loss)   (microbatch.py)
    step.finish_gradients(params)                e.g. rescale to a weighted mean
    metrics  = step.metrics()                    the step's numbers, summed over all ranks

and, before the first and after the last step, `signal.evaluate(student, prompts)`. The loop never asks
which kind of teacher it has. A new signal is a new module implementing this protocol, registered in
signals/__init__.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from opd_client.schema import ModelInfo
from opd_student.microbatch import MicroBatch
from opd_student.prompts import Prompt
from opd_student.rollouts import Rollout
from opd_student.student_model import Student


@dataclass
class EvalResult:
    """Held-out numbers (metrics.jsonl keys "eval/...") and the line the trainer prints about them."""

    metrics: dict[str, Any]
    summary: str


class StepLoss(Protocol):
    """The loss of one optimizer step, built from the step's whole feedback (all ranks' where it matters:
    baselines, selections, normalisers)."""

    normaliser: float  # what each micro-batch's loss sum is divided by (the step's tokens, all ranks)
    # what the step trains on: its rollouts, and any sequences the signal adds (the same count on every
    # rank); per_token_loss's micro-batch indices point into this list
    sequences: list[Rollout]

    def per_token_loss(self, mb: MicroBatch) -> torch.Tensor:
        """The masked per-token loss [B, T] of one micro-batch (called inside the gradient loop)."""
        ...

    def finish_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """After the last micro-batch, before clipping (e.g. turn Σwℓ/N into Σwℓ/Σw)."""
        ...

    def metrics(self) -> dict[str, Any]:
        """The step's numbers (loss, KL or reward, token counts), over all ranks."""
        ...


class TeacherSignal(Protocol):
    progress: tuple[str, str]  # (label, metrics key) the progress bar shows beside the loss

    def check_teacher(self, info: ModelInfo, url: str) -> None:
        """Refuse, with a clear SystemExit, a teacher that cannot give this signal."""
        ...

    def request(self, rollouts: list[Rollout]) -> Any:
        """Send this rank's rollouts of a step to the teacher; what comes back is collect()'s argument."""
        ...

    def collect(self, request: Any) -> Any:
        """The teacher's answers to request() (the signal's own feedback type), once all have come."""
        ...

    def step_loss(self, rollouts: list[Rollout], feedback: Any) -> StepLoss: ...

    def evaluate(self, student: Student, prompts: list[Prompt], seed: int) -> EvalResult: ...
