"""`opd train`: the on-policy distillation loop, read top to bottom.

per step: sample rollouts from the student → send them to the teacher (pipelined: the next batch is
sampled while this one is scored) → the teacher signal's loss on the completion tokens, accumulated over
micro-batches → optimiser step → metrics → checkpoint. What kind of teacher it is (token scores, chunk
rewards) is the signal's business (signals/); the loop never asks.
"""

from __future__ import annotations

import math
import random
import signal as os_signal
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from opd_student.batches import StepRollouts
from opd_student.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from opd_student.config import TrainConfig
from opd_student.distributed import peak_memory_mib, plain_float, state_mib
from opd_student.methods.cold_start import cold_start
from opd_student.metrics_log import MetricsLog
from opd_student.microbatch import accumulate_gradients, clip_and_step
from opd_student.run import Run, setup_run


@dataclass
class Batch:
    step: StepRollouts  # the rollouts, the data position before them, their horizon
    request: Any  # the teacher signal's requests in flight


@contextmanager
def timed(name: str, metrics: dict):
    started = time.perf_counter()
    yield
    metrics[f"time/{name}_s"] = metrics.get(f"time/{name}_s", 0.0) + time.perf_counter() - started


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    run = setup_run(cfg, resume)
    try:
        _loop(cfg, run)
    finally:
        run.close()
    return run.dir


def _loop(cfg: TrainConfig, run: Run) -> None:
    student, teacher_signal, source, world, console = (
        run.student,
        run.signal,
        run.batches,
        run.world,
        run.console,
    )
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    metrics_log = MetricsLog(run.dir) if world.is_main else None  # rank 0 writes, for all ranks

    step = 0
    checkpoint = latest_checkpoint(run.dir)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, student.trainable, optimizer, scheduler)
        step = state["step"]
        source.load_state_dict(state["data"], legacy_mix_rng=state.get("mix_rng"))
        run.extras.resume(step)  # effopd: the modules frozen before
        if metrics_log is not None:
            metrics_log.truncate_after(step)
        console.say(f"resumed from {checkpoint} at step {step}")
    else:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)

    def run_eval(at_step: int) -> None:
        result = teacher_signal.evaluate(student, run.eval_prompts, seed=cfg.seed + 1234)
        _log(metrics_log, {"step": at_step, "eval": True, **result.metrics})
        console.say(f"eval at step {at_step}: {result.summary}")

    if step == 0:
        run_eval(0)
        cold_start(cfg, run)  # cold_start_steps: SFT on the teacher's samples first (methods/cold_start.py)

    stop = _StopFlag()
    pending: deque[Batch] = deque()

    def save(at_step: int) -> None:
        data_state = pending[0].step.state if pending else source.state_dict()
        path = save_checkpoint(
            run.dir, at_step, student.trainable, optimizer, scheduler, {"data": data_state}, world=world,
            keep=cfg.keep_checkpoints,
        )  # fmt: skip
        console.say(f"checkpoint {path.name}")

    bar = tqdm(
        total=cfg.steps,
        initial=step,
        desc="opd train",
        unit="step",
        dynamic_ncols=True,
        disable=not world.is_main,
    )
    console.hook = bar.write
    student.train()
    while step < cfg.steps and not stop.requested:
        metrics: dict = {}
        # Sample up to max_staleness batches ahead: the teacher scores them while this step trains.
        while len(pending) < min(cfg.max_staleness + 1, cfg.steps - step):
            with timed("sample", metrics):
                rollouts = source.next(step + len(pending))
                pending.append(Batch(rollouts, teacher_signal.request(rollouts.rollouts)))
        batch = pending.popleft()
        with timed("score_wait", metrics):
            feedback = teacher_signal.collect(batch.request)
        with timed("train", metrics):
            loss = teacher_signal.step_loss(batch.step.rollouts, feedback)
            optimizer.zero_grad(set_to_none=True)
            accumulate_gradients(
                student, loss.sequences, cfg.micro_batch_size, loss.normaliser, loss.per_token_loss
            )
            params = student.parameters()
            loss.finish_gradients(params)
            metrics.update(run.extras.before_clip(params, step))  # lm_coef, update_mask
            grad_norm = clip_and_step(params, cfg.grad_clip, optimizer, scheduler)
            metrics.update({**loss.metrics(), "grad_norm": plain_float(grad_norm)})
        metrics.update(run.methods.generation_metrics(batch.step.rollouts, batch.step.horizon, world))
        metrics.update(batch.step.metrics)  # what making the rollouts cost (TRB, TRD: methods/sampling.py)
        step += 1
        metrics.update(run.follower.after_step(step))  # teacher_follows_student: the teacher learns too
        metrics.update(run.extras.after_step(step))  # effopd: freeze the slow modules after the probe
        metrics.update(
            {
                "step": step,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": metrics["tokens"]
                / max(1e-9, sum(v for k, v in metrics.items() if k.startswith("time/"))),
                "mem/peak_mib": world.max(peak_memory_mib(student.device)),  # the largest rank's
                "mem/state_mib": world.max(state_mib(student.trainable, optimizer)),
            }
        )
        _log(metrics_log, metrics)
        bar.update(1)
        label, key = teacher_signal.progress
        bar.set_postfix(
            {"loss": f"{metrics['loss']:.4f}", label: f"{metrics[key]:.3f}"},
            tok_s=f"{metrics['tokens_per_s']:.0f}",
        )
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            run_eval(step)
        # Every rank must stop after the same step (torchrun signals each rank on its own).
        stop.requested = world.sum([float(stop.requested)])[0] > 0
        if (cfg.save_every and step % cfg.save_every == 0) or stop.requested or step == cfg.steps:
            save(step)
    bar.close()
    console.hook = None
    if stop.requested:
        console.say(f"stopped by {stop.signal_name} at step {step}; resume with --resume --out {run.dir}")
        return
    run_eval(step)
    student.save_final(run.dir / "final")
    console.say(f"trained student saved to {run.dir / 'final'}")
    if metrics_log is not None:
        metrics_log.close()


def _log(metrics_log: MetricsLog | None, record: dict) -> None:
    if metrics_log is not None:
        metrics_log.log(record)


def _lr_lambda(cfg: TrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


class _StopFlag:
    """SIGTERM/SIGINT ask the loop to finish the current step, checkpoint, and exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        for sig in (os_signal.SIGTERM, os_signal.SIGINT):
            os_signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = os_signal.Signals(signum).name
