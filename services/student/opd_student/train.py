"""`opd train`: the on-policy distillation loop, read top to bottom.

per step: sample rollouts from the student → the teacher scores them (pipelined: the next batch is
sampled while this one is scored) → OPD loss on completion tokens → optimiser step → metrics →
checkpoint.
"""

from __future__ import annotations

import math
import random
import signal
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from opd_student import chunk_train, losses
from opd_student.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from opd_student.config import TrainConfig
from opd_student.distributed import gradient_sync, peak_memory_mib, plain_float, state_mib
from opd_student.evaluation import evaluate
from opd_student.methods.teacher_metrics import TeacherMetrics
from opd_student.metrics_log import MetricsLog
from opd_student.prompts import PromptStream, load_prompts, render
from opd_student.rollouts import (
    Rollout,
    pack,
    row_seed,
    sample_completions,
    student_logprobs,
    teacher_tensors,
)
from opd_student.run_setup import RunContext, setup_run


@dataclass
class Batch:
    rollouts: list[Rollout]
    futures: list
    data_state: dict  # prompt-stream position before this batch was drawn (resume restarts here)
    horizon: int  # the most completion tokens a rollout may have (TOPD / POPD; else max_new_tokens)
    score_ids: list | None = None  # the student's own top-k ids per position (student_topk_reverse_kl)
    chunk_requests: list | None = None  # loss chunk: one black-box chunk-score request per rollout


@contextmanager
def timed(name: str, metrics: dict):
    started = time.perf_counter()
    yield
    metrics[f"time/{name}_s"] = metrics.get(f"time/{name}_s", 0.0) + time.perf_counter() - started


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    ctx = setup_run(cfg, resume)
    try:
        _loop(cfg, ctx)
    finally:
        ctx.close()
    return ctx.run_dir


def _loop(cfg: TrainConfig, ctx: RunContext) -> None:
    model, tokenizer, link, world = ctx.model, ctx.tokenizer, ctx.link, ctx.world
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    stream = PromptStream(load_prompts(cfg.prompts), seed=cfg.seed)
    eval_prompts = load_prompts(cfg.eval_prompts)[: cfg.eval_num_prompts]
    ctx.methods.check_teachers(link, tokenizer, stream.prompts)  # every teacher routed to exists
    metrics_log = MetricsLog(ctx.run_dir) if world.is_main else None  # rank 0 writes, for all ranks
    mix_rng = random.Random(cfg.seed)

    step = 0
    checkpoint = latest_checkpoint(ctx.run_dir)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler)
        step = state["step"]
        stream.load_state_dict(state["data"])
        mix_rng.setstate(state["mix_rng"])
        if metrics_log is not None:
            metrics_log.truncate_after(step)
        ctx.say(f"resumed from {checkpoint} at step {step}")
    else:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)

    def run_eval(at_step: int) -> None:
        if cfg.loss == "chunk":  # a black-box teacher has no logprobs: held-out chunk reward instead of KL
            result = chunk_train.chunk_evaluate(
                ctx.student, tokenizer, link, eval_prompts, cfg, seed=cfg.seed + 1234, world=world
            )
            _log(metrics_log, {"step": at_step, "eval": True, **result})
            ctx.say(
                f"eval at step {at_step}: chunk reward {result['eval/chunk_reward']:.4f}, similarity "
                f"{result['eval/chunk_similarity']:.4f}, accepted {result['eval/chunk_accept_rate']:.3f}"
            )
            return
        result = evaluate(
            ctx.student,
            tokenizer,
            link,
            eval_prompts,
            cfg.eval_max_new_tokens,
            cfg.teacher_model,
            seed=cfg.seed + 1234,
            world=world,
        )
        _log(metrics_log, {"step": at_step, "eval": True, **result})
        ctx.say(
            f"eval at step {at_step}: sampled reverse KL {result['eval/reverse_kl']:.4f}, "
            f"top-20 forward KL {result['eval/topk_forward_kl']:.4f} nats/token"
        )

    if step == 0:
        run_eval(0)

    stop = _StopFlag()
    pending: deque[Batch] = deque()

    def save(at_step: int) -> None:
        data_state = pending[0].data_state if pending else stream.state_dict()
        path = save_checkpoint(
            ctx.run_dir,
            at_step,
            model,
            optimizer,
            scheduler,
            {"data": data_state, "mix_rng": mix_rng.getstate()},
            world=world,
            keep=cfg.keep_checkpoints,
        )
        ctx.say(f"checkpoint {path.name}")

    bar = tqdm(
        total=cfg.steps,
        initial=step,
        desc="opd train",
        unit="step",
        dynamic_ncols=True,
        disable=not world.is_main,
    )
    ctx.say_hook = bar.write
    model.train()
    while step < cfg.steps and not stop.requested:
        metrics: dict = {}
        # Sample up to max_staleness batches ahead: the teacher scores them while this step trains.
        while len(pending) < min(cfg.max_staleness + 1, cfg.steps - step):
            with timed("sample", metrics):
                pending.append(_next_batch(cfg, ctx, stream, mix_rng, step + len(pending)))
        batch = pending.popleft()
        with timed("score_wait", metrics):
            if batch.chunk_requests is not None:
                scores = link.collect_chunks(batch.chunk_requests, batch.futures)
            else:
                scores = link.collect(batch.rollouts, batch.futures, cfg.top_k, batch.score_ids)
        with timed("train", metrics):
            if batch.chunk_requests is not None:
                step_metrics = chunk_train.chunk_optimizer_step(
                    cfg, ctx, optimizer, scheduler, batch.rollouts, scores
                )
            else:
                step_metrics = _optimizer_step(cfg, ctx, optimizer, scheduler, batch, scores)
            metrics.update(step_metrics)
        metrics.update(ctx.methods.generation_metrics(batch.rollouts, batch.horizon, world))
        step += 1
        tokens = metrics["tokens"]
        metrics.update(
            {
                "step": step,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": tokens
                / max(1e-9, sum(v for k, v in metrics.items() if k.startswith("time/"))),
                "mem/peak_mib": world.max(peak_memory_mib(ctx.device)),  # the largest rank's
                "mem/state_mib": world.max(state_mib(model, optimizer)),
            }
        )
        _log(metrics_log, metrics)
        bar.update(1)
        signal = ("reward", "chunk/reward") if cfg.loss == "chunk" else ("kl", "kl/sampled_reverse")
        bar.set_postfix(
            {"loss": f"{metrics['loss']:.4f}", signal[0]: f"{metrics[signal[1]]:.3f}"},
            tok_s=f"{metrics['tokens_per_s']:.0f}",
        )
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            run_eval(step)
        # Every rank must stop after the same step (torchrun signals each rank on its own).
        stop.requested = world.sum([float(stop.requested)])[0] > 0
        if (cfg.save_every and step % cfg.save_every == 0) or stop.requested or step == cfg.steps:
            save(step)
    bar.close()
    ctx.say_hook = None
    if stop.requested:
        ctx.say(f"stopped by {stop.signal_name} at step {step}; resume with --resume --out {ctx.run_dir}")
        return
    run_eval(step)
    ctx.save_final()
    if metrics_log is not None:
        metrics_log.close()


def _log(metrics_log: MetricsLog | None, record: dict) -> None:
    if metrics_log is not None:
        metrics_log.log(record)


def _next_batch(
    cfg: TrainConfig, ctx: RunContext, stream: PromptStream, mix_rng: random.Random, index: int
) -> Batch:
    """Sample the rollouts of the step with 0-based index `index` (or take dataset sequences, GKD's
    1 − λ), up to its horizon, and send them to the teacher."""
    horizon = ctx.methods.horizon(index)  # generation stops there (TOPD / POPD)
    data_state = stream.state_dict()
    on_policy = losses.gkd_mix(mix_rng, cfg.gkd_lambda)  # one draw per step whatever λ: same RNG stream
    G = cfg.samples_per_prompt
    if on_policy:
        # Every rank draws the whole step (so all hold the same data position) and samples its share.
        step_prompts = [next(stream) for _ in range(cfg.prompts_per_step)]
        mine = ctx.world.share(len(step_prompts))
        prompts = [step_prompts[p] for p in mine]
        prompt_ids = [render(p, ctx.tokenizer) for p in prompts]
        # No autocast here: under autocast every decoding step re-casts the weights (measured 6x slower on CPU).
        completions_P_G = sample_completions(
            ctx.student,
            prompt_ids,
            G,
            horizon,
            cfg.temperature,
            ctx.tokenizer.eos_token_id,
            ctx.tokenizer.pad_token_id,
            row_seeds=[row_seed(cfg.seed, 0, index, p * G + g) for p in mine for g in range(G)],
        )
        rollouts = ctx.methods.rollouts(prompts, prompt_ids, completions_P_G, ctx.tokenizer)
    else:
        step_rollouts = ctx.dataset_rollouts(cfg.rollouts_per_step)
        rollouts = ctx.methods.cut([step_rollouts[i] for i in ctx.world.share(len(step_rollouts))], horizon)
    if cfg.loss == "chunk":  # black-box teacher: chunk-score requests instead of token scores
        entropies = None
        if cfg.chunk_select == "entropy":
            entropies = chunk_train.student_entropies(
                ctx.student, rollouts, ctx.tokenizer.pad_token_id, cfg.micro_batch_size, ctx.bf16
            )
        prompts_R = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
        requests = chunk_train.chunk_requests(cfg, ctx.tokenizer, prompts_R, rollouts, entropies)
        return Batch(rollouts, ctx.link.submit_chunks(requests), data_state, horizon, chunk_requests=requests)
    score_ids = _student_top_ids(cfg, ctx, rollouts) if cfg.loss == "student_topk_reverse_kl" else None
    futures = ctx.link.submit(rollouts, cfg.top_k, score_ids)
    return Batch(rollouts, futures, data_state, horizon, score_ids)


@torch.no_grad()
def _student_top_ids(cfg: TrainConfig, ctx: RunContext, rollouts: list[Rollout]) -> list:
    """The student's top-k ids at each completion position, for the teacher to score (score_ids)."""
    out = []
    for start in range(0, len(rollouts), cfg.micro_batch_size):
        chunk = rollouts[start : start + cfg.micro_batch_size]
        batch = pack(chunk, ctx.tokenizer.pad_token_id)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.bf16):
            top_B_T_K = student_logprobs(ctx.student, batch).topk(cfg.top_k, dim=-1).indices.cpu()
        out += [top_B_T_K[b, : len(r.completion_ids)].tolist() for b, r in enumerate(chunk)]
    return out


def _optimizer_step(cfg: TrainConfig, ctx: RunContext, optimizer, scheduler, batch: Batch, scores) -> dict:
    """Gradient accumulation over micro-batches, normalised by the step's total completion tokens over all
    ranks (or, with token weights from the methods, by their sum: methods/step_weights.py)."""
    rollouts, world = batch.rollouts, ctx.world
    weights = ctx.methods.step_weights(ctx, rollouts, scores)
    per_teacher = TeacherMetrics() if ctx.methods.several_teachers else None
    local_tokens = sum(len(r.completion_ids) for r in rollouts)
    total_tokens = world.sum([local_tokens])[0]
    loss_sum = kl_sum = teacher_lp_sum = 0.0
    optimizer.zero_grad(set_to_none=True)
    starts = range(0, len(rollouts), cfg.micro_batch_size)  # the same count on every rank
    for start in starts:
        idx = range(start, min(start + cfg.micro_batch_size, len(rollouts)))
        mb = pack([rollouts[i] for i in idx], ctx.tokenizer.pad_token_id)
        teacher = teacher_tensors([scores[i] for i in idx], mb.mask_B_T.shape[1])
        score_ids = None
        if batch.score_ids is not None:
            score_ids = torch.zeros_like(teacher.score_logprobs_B_T_M, dtype=torch.long)
            for b, i in enumerate(idx):
                score_ids[b, : len(batch.score_ids[i])] = torch.tensor(batch.score_ids[i])
        with gradient_sync(ctx.student, enabled=start == starts[-1]):
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.bf16):
                logprobs_B_T_V = student_logprobs(ctx.student, mb)
            logprobs_B_T_V = logprobs_B_T_V.cpu() if logprobs_B_T_V.device.type != "cpu" else logprobs_B_T_V
            q_tok_B_T = logprobs_B_T_V.gather(-1, mb.targets_B_T[..., None])[..., 0]
            per_token_B_T = _loss(cfg, logprobs_B_T_V, q_tok_B_T, teacher, mb.mask_B_T, score_ids)
            weights_B_T = weights.micro_batch(list(idx), logprobs_B_T_V, teacher, mb.mask_B_T)
            if weights_B_T is not None:
                per_token_B_T = per_token_B_T * weights_B_T
            # DDP and FSDP average gradients over ranks; × world size makes that the sum over all tokens.
            (losses.token_mean(per_token_B_T, total_tokens) * world.size).backward()
        loss_sum += per_token_B_T.sum().item()
        kl_B_T = losses.sampled_reverse_kl(q_tok_B_T.detach(), teacher.token_logprobs_B_T, mb.mask_B_T)
        kl_sum += kl_B_T.sum().item()
        if per_teacher is not None:
            per_teacher.add(
                [rollouts[i].teacher for i in idx], kl_B_T, teacher.token_logprobs_B_T, mb.mask_B_T
            )
        teacher_lp_sum += (teacher.token_logprobs_B_T * mb.mask_B_T).sum().item()
    if world.distributed:  # the step's sums over all ranks (one all-reduce)
        local_weight = weights.weight_sum if weights.active else float(local_tokens)
        any_active, weight_sum, in_loss, loss_sum, kl_sum, teacher_lp_sum, n_rollouts = world.sum(
            [float(weights.active), local_weight, weights.tokens_in_loss, loss_sum, kl_sum, teacher_lp_sum,
             len(rollouts)]
        )  # fmt: skip
        weights.active = any_active > 0
        weights.total_tokens, weights.weight_sum = int(total_tokens), weight_sum
        weights.tokens_in_loss = int(in_loss)
    else:
        n_rollouts = len(rollouts)
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    weights.rescale_gradients(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    optimizer.step()
    scheduler.step()
    return {
        "loss": loss_sum / weights.loss_denominator(),
        "kl/sampled_reverse": kl_sum / total_tokens,
        "teacher/logprob": teacher_lp_sum / total_tokens,
        "tokens": int(total_tokens),
        "rollouts": int(n_rollouts),
        "on_policy": int(rollouts[0].on_policy),
        "grad_norm": plain_float(grad_norm),
        "completion_len": total_tokens / n_rollouts,
        **weights.metrics(),
        **(per_teacher.record(world) if per_teacher is not None else {}),
    }


def _loss(cfg: TrainConfig, logprobs_B_T_V, q_tok_B_T, teacher, mask_B_T, score_ids_B_T_K):
    if cfg.loss == "reverse_kl":
        adv_B_T = losses.reverse_kl_advantages(
            q_tok_B_T.detach(), teacher.token_logprobs_B_T, mask_B_T, discount=cfg.discount
        )
        return losses.policy_gradient_loss(q_tok_B_T, adv_B_T, mask_B_T)
    if cfg.loss == "topk_forward_kl":
        return losses.topk_forward_kl(
            logprobs_B_T_V,
            teacher.top_ids_B_T_K,
            teacher.top_logprobs_B_T_K,
            teacher.tail_logprob_B_T,
            mask_B_T,
        )
    if cfg.loss == "student_topk_reverse_kl":
        return losses.student_topk_reverse_kl(
            logprobs_B_T_V, score_ids_B_T_K, teacher.score_logprobs_B_T_M, mask_B_T
        )
    return losses.generalized_jsd(
        logprobs_B_T_V,
        teacher.top_ids_B_T_K,
        teacher.top_logprobs_B_T_K,
        teacher.tail_logprob_B_T,
        mask_B_T,
        beta=cfg.jsd_beta,
    )


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
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
