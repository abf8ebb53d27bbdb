"""Off-policy cold start, after Li et al. 2026, *Rethinking On-Policy Distillation of Large Language
Models: Phenomenology, Mechanism, and Recipe* (arXiv 2604.13016): before on-policy distillation, a short
supervised fine-tuning on the teacher's own samples, to bring the student's states near the teacher's
("off-policy cold start", one of the paper's two recipes to recover failing OPD). The paper's data and
length of that phase are its own; ours, at CPU scale:

- `cold_start_steps` steps, each on `prompts_per_step` prompts × `samples_per_prompt` answers sampled by
  the teacher service itself (`POST /inference/v1/generate`, temperature 1, seeded per answer, at most
  `max_new_tokens`), from a prompt stream of its own (seed + 1) so the OPD phase sees the prompts it
  would see without the cold start;
- the loss is the token-mean negative log-likelihood of the teacher's tokens after the student's prompt
  (what `opd bench compare`'s SFT arm trains, opd_bench/compare/sft_arm.py), with a fresh AdamW at the
  run's lr, weight decay and gradient clipping; the OPD phase then starts its own optimizer.

It runs once, after the evaluation at step 0 and before the first OPD step (a resumed run skips it), and
writes what it did to RUN_DIR/cold_start.json (steps, loss per step, teacher tokens, seconds).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from opd_student import losses
from opd_student.microbatch import MicroBatch, accumulate_gradients
from opd_student.prompts import PromptStream
from opd_student.rollouts import Rollout, row_seed

_STREAM = 13  # row_seed's second key for the cold start's teacher samples


def sft_loss(mb: MicroBatch) -> torch.Tensor:
    """−log q(y_t) on every real token of the micro-batch [B, T] (the teacher wrote them)."""
    return losses.policy_gradient_loss(mb.token_logprobs_B_T, mb.mask_B_T, mb.mask_B_T)


class _Summed:
    """sft_loss per micro-batch, keeping the sum of its values."""

    def __init__(self) -> None:
        self.total = 0.0

    def __call__(self, mb: MicroBatch) -> torch.Tensor:
        loss_B_T = sft_loss(mb)
        self.total += float(loss_B_T.detach().sum())
        return loss_B_T


def cold_start(cfg, run) -> None:
    """cold_start_steps SFT steps on teacher samples (module docstring); nothing when it is 0."""
    if cfg.cold_start_steps == 0:
        return
    student, link, factory, world = run.student, run.teacher.link, run.batches.factory, run.world
    stream = PromptStream(run.batches.stream.prompts, seed=cfg.seed + 1)
    params = student.parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    started, teacher_tokens, losses_K = time.perf_counter(), 0, []
    for k in range(cfg.cold_start_steps):
        step_prompts = stream.take(cfg.prompts_per_step)
        mine = [step_prompts[p] for p in world.share(len(step_prompts))]
        rollouts: list[Rollout] = []
        for p_index, prompt in enumerate(mine):
            ids = factory.prompt_ids(prompt)
            view = factory.group(prompt, ids, [[]])[0]
            teacher_ids = view.teacher_prefix_ids if view.teacher_prefix_ids is not None else ids
            for g in range(cfg.samples_per_prompt):
                seed = row_seed(
                    cfg.seed, _STREAM, k, world.rank * 10_000 + p_index * cfg.samples_per_prompt + g
                )
                answer = link.client.generate_tokens(
                    teacher_ids, cfg.max_new_tokens, temperature=1.0, seed=seed, model=view.teacher
                )[: cfg.max_new_tokens]
                rollouts.append(Rollout(ids, answer or [student.eos_token_id], teacher=view.teacher))
        local = sum(len(r.completion_ids) for r in rollouts)
        total = world.sum([float(local)])[0]
        teacher_tokens += int(total)
        optimizer.zero_grad(set_to_none=True)
        nll = _Summed()
        accumulate_gradients(student, rollouts, cfg.micro_batch_size, total, nll)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        optimizer.step()
        losses_K.append(world.sum([nll.total])[0] / max(1.0, total))
    seconds = time.perf_counter() - started
    run.console.say(
        f"cold start: {cfg.cold_start_steps} SFT steps on {teacher_tokens} teacher tokens in {seconds:.0f} s "
        f"(NLL {losses_K[0]:.3f} -> {losses_K[-1]:.3f})"
    )
    if world.is_main:
        record = {
            "steps": cfg.cold_start_steps,
            "loss": losses_K,
            "teacher_tokens": teacher_tokens,
            "seconds": seconds,
        }
        (Path(run.dir) / "cold_start.json").write_text(json.dumps(record, indent=1) + "\n")
