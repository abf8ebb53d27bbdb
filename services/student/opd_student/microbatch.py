"""The step's rollouts in micro-batches: one gradient-accumulating loop and one no-grad pass, used by every
teacher signal and method.

`accumulate_gradients` owns the distributed mechanics, so no signal repeats them: every rank runs the same
number of micro-batches; only the last one synchronises gradients (DDP/FSDP2); the forward runs under the
run's autocast; each micro-batch's per-token loss sum is divided by the step's normaliser over all ranks
(its completion tokens: the accumulated gradient is then exactly one big batch's per-token mean, see
losses.token_mean) and multiplied by the world size, because DDP and FSDP average gradients over ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from opd_student import losses
from opd_student.distributed import gradient_sync
from opd_student.rollouts import PackedBatch, Rollout, pack
from opd_student.student_model import Student

T = TypeVar("T")


@dataclass
class MicroBatch:
    """Rollouts idx of the step, packed, and the student's log q over the vocabulary at their completion
    positions (fp32, CPU; with grad inside accumulate_gradients)."""

    idx: range
    batch: PackedBatch
    logprobs_B_T_V: torch.Tensor

    @property
    def mask_B_T(self) -> torch.Tensor:
        return self.batch.mask_B_T

    @property
    def token_logprobs_B_T(self) -> torch.Tensor:
        """log q(x_t) of the completion tokens themselves."""
        return self.logprobs_B_T_V.gather(-1, self.batch.targets_B_T[..., None])[..., 0]


def micro_batches(n: int, size: int) -> list[range]:
    """Consecutive index ranges of at most `size` (the same count on every rank: equal shares)."""
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def accumulate_gradients(
    student: Student,
    rollouts: list[Rollout],
    micro_batch_size: int,
    normaliser: float,
    per_token_loss: Callable[[MicroBatch], torch.Tensor],
) -> None:
    """Backpropagate Σ_t ℓ_t / normaliser over the step's rollouts, micro-batch by micro-batch.

    `per_token_loss(mb)` returns the masked per-token loss [B, T] of one micro-batch; `normaliser` is the
    whole step's (all ranks'). Gradients accumulate into the parameters' .grad (the caller zeroes them).
    """
    parts = micro_batches(len(rollouts), micro_batch_size)
    world = student.world
    for i, idx in enumerate(parts):
        batch = pack([rollouts[j] for j in idx], student.pad_token_id)
        with gradient_sync(student.scorer, enabled=i == len(parts) - 1):
            mb = MicroBatch(idx, batch, student.logprobs(batch))
            per_token_B_T = per_token_loss(mb)
            (losses.token_mean(per_token_B_T, normaliser) * world.size).backward()


@torch.no_grad()
def no_grad_pass(
    student: Student,
    rollouts: list[Rollout],
    micro_batch_size: int,
    per_rollout: Callable[[MicroBatch], list[T]],
) -> list[T]:
    """One no-grad student forward over the rollouts (under the run's autocast); `per_rollout(mb)` turns a
    micro-batch's log q into one value per rollout of it. Used where a signal or method needs the student's
    distribution before the step (its top-k ids, entropies, teachability)."""
    out: list[T] = []
    for idx in micro_batches(len(rollouts), micro_batch_size):
        batch = pack([rollouts[j] for j in idx], student.pad_token_id)
        out += per_rollout(MicroBatch(idx, batch, student.logprobs(batch)))
    return out


def clip_and_step(params: list[torch.nn.Parameter], grad_clip: float, optimizer, scheduler) -> torch.Tensor:
    """Clip the accumulated gradient's global norm (0: no clipping), step the optimiser and schedule."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    scheduler.step()
    return grad_norm
