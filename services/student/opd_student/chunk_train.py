"""`--loss chunk`: on-policy distillation from a black-box teacher (an OpenAI-compatible chat API).

The teacher gives no logprobs of the student's tokens, only text. Per rollout the trainer sends the chat
prompt and the completion (one string per student token) with the student's entropy at each token to
POST /v1/chunk-score; the service picks M chunks where the student was least sure, has the teacher continue
each chunk's prefix N times, and rewards the chunk by how many continuations say the same thing
(opd_teacher.blackbox.chunk_scorer). The loss is then

    Σ_chunks −(r_c − b) · Σ_{t ∈ c} log q(x_t)  +  β · Σ_{t ∉ chunks} KL(q_t ‖ q0_t)

r_c the chunk's reward, b the step's mean reward (chunk_baseline), q0 the initial student (frozen), β =
chunk_kl_coef; all divided by the step's completion tokens, as the other losses. Under torchrun each rank
scores its share of the rollouts; the baseline, the token count and the logged numbers are the whole step's.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from opd_client.schema import ChunkScoreRequest, ChunkScoreResponse
from opd_student import losses
from opd_student.config import TrainConfig
from opd_student.distributed import SINGLE, World, gradient_sync, plain_float
from opd_student.prompts import Prompt, render
from opd_student.rollouts import Rollout, pack, sample_completions, student_logprobs, unwrap


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """One string per token whose concatenation is the decoded text (special tokens such as EOS are "").

    Decoding token by token would split multi-byte characters into replacement marks; decoding growing
    prefixes and taking the new characters keeps every character whole: a token that ends inside a
    character gets "" and the next one carries the character.
    """
    pieces, emitted = [], ""
    for t in range(len(ids)):
        text = tokenizer.decode(ids[: t + 1], skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(emitted):
            pieces.append("")
            continue
        pieces.append(text[len(emitted) :])
        emitted = text
    final = tokenizer.decode(ids, skip_special_tokens=True)
    if final != emitted and final.startswith(emitted):
        pieces[-1] += final[len(emitted) :]
    return pieces


def teacher_chat(prompt: Prompt) -> list[dict]:
    """The chat the API teacher sees: teacher_messages (privileged context) if any, else the prompt."""
    if prompt.teacher_messages is not None:
        return prompt.teacher_messages
    if prompt.messages is not None:
        return prompt.messages
    return [{"role": "user", "content": prompt.prompt}]


@torch.no_grad()
def student_entropies(lm, rollouts: list[Rollout], pad_token_id: int, micro_batch: int, bf16: bool) -> list:
    """entropies_R_T: the student's entropy (nats) of its next-token distribution at each completion token."""
    out = []
    for start in range(0, len(rollouts), micro_batch):
        chunk = rollouts[start : start + micro_batch]
        batch = pack(chunk, pad_token_id)
        with torch.autocast(unwrap(lm).device.type, dtype=torch.bfloat16, enabled=bf16):
            logprobs_B_T_V = student_logprobs(lm, batch).float()
        entropy_B_T = -(logprobs_B_T_V.exp() * logprobs_B_T_V).sum(-1).cpu()
        out += [entropy_B_T[b, : len(r.completion_ids)].tolist() for b, r in enumerate(chunk)]
    return out


def chunk_requests(
    cfg: TrainConfig,
    tokenizer,
    prompts_R: list[Prompt],
    rollouts: list[Rollout],
    entropies_R_T: list | None,
    num_chunks: int | None = None,
) -> list[ChunkScoreRequest]:
    return [
        ChunkScoreRequest(
            model=r.teacher,
            messages=teacher_chat(p),
            completion=token_pieces(tokenizer, r.completion_ids),
            entropies=entropies_R_T[i] if entropies_R_T is not None else None,
            num_chunks=num_chunks or cfg.chunk_num,
            chunk_tokens=cfg.chunk_tokens,
            num_samples=cfg.chunk_samples,
            temperature=cfg.chunk_teacher_temperature,
            similarity_threshold=cfg.chunk_threshold,
            prior=cfg.chunk_prior,
            alpha=cfg.chunk_alpha,
        )
        for i, (p, r) in enumerate(zip(prompts_R, rollouts, strict=True))
    ]


def chunk_reward(cfg: TrainConfig, chunk) -> float:
    if cfg.chunk_reward == "similarity":
        return chunk.similarity
    if cfg.chunk_reward == "edit_similarity":
        return chunk.edit_similarity
    return chunk.reward


def chunk_optimizer_step(
    cfg: TrainConfig, ctx, optimizer, scheduler, rollouts: list[Rollout], responses: list[ChunkScoreResponse]
) -> dict:
    """One optimiser step of the chunk loss (gradient accumulation over micro-batches, as in train.py)."""
    world = ctx.world
    everyone = _all_ranks(world, responses)  # the whole step's chunks: baseline and metrics
    rewards = [chunk_reward(cfg, c) for r in everyone for c in r.chunks]
    baseline = float(np.mean(rewards)) if cfg.chunk_baseline and rewards else 0.0
    total_tokens = world.sum([sum(len(r.completion_ids) for r in rollouts)])[0]
    loss_sum = kl_sum = outside_tokens = 0.0
    optimizer.zero_grad(set_to_none=True)
    starts = range(0, len(rollouts), cfg.micro_batch_size)  # the same count on every rank
    for start in starts:
        idx = range(start, min(start + cfg.micro_batch_size, len(rollouts)))
        mb = pack([rollouts[i] for i in idx], ctx.tokenizer.pad_token_id)
        weights_B_T, chunk_B_T = chunk_weights(cfg, [responses[i] for i in idx], mb.mask_B_T.shape, baseline)
        with gradient_sync(ctx.student, enabled=start == starts[-1]):
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.bf16):
                logprobs_B_T_V = student_logprobs(ctx.student, mb)
            logprobs_B_T_V = logprobs_B_T_V.cpu() if logprobs_B_T_V.device.type != "cpu" else logprobs_B_T_V
            q_tok_B_T = logprobs_B_T_V.gather(-1, mb.targets_B_T[..., None])[..., 0]
            per_token_B_T = losses.chunk_weighted_nll(q_tok_B_T, weights_B_T, chunk_B_T)
            outside_B_T = mb.mask_B_T * (1.0 - chunk_B_T)
            if cfg.chunk_kl_coef > 0 and ctx.reference is not None:
                with torch.no_grad(), torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.bf16):
                    reference_B_T_V = student_logprobs(ctx.reference, mb).cpu()
                kl_B_T = losses.reverse_kl_to_reference(logprobs_B_T_V, reference_B_T_V, outside_B_T)
                per_token_B_T = per_token_B_T + cfg.chunk_kl_coef * kl_B_T
                kl_sum += kl_B_T.sum().item()
            # DDP and FSDP average gradients over ranks; × world size makes that the sum over all tokens.
            (losses.token_mean(per_token_B_T, total_tokens) * world.size).backward()
        loss_sum += per_token_B_T.sum().item()
        outside_tokens += outside_B_T.sum().item()
    loss_sum, kl_sum, outside_tokens, n_rollouts = world.sum(
        [loss_sum, kl_sum, outside_tokens, len(rollouts)]
    )
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for p in ctx.model.parameters() if p.requires_grad],
        cfg.grad_clip if cfg.grad_clip > 0 else math.inf,
    )
    optimizer.step()
    scheduler.step()
    return {
        "loss": loss_sum / total_tokens,
        **chunk_metrics(everyone, rewards, "chunk/"),
        "chunk/baseline": baseline,
        "chunk/token_fraction": 1.0 - outside_tokens / total_tokens,
        "kl/initial": kl_sum / max(1.0, outside_tokens),
        "tokens": int(total_tokens),
        "rollouts": int(n_rollouts),
        "on_policy": 1,
        "grad_norm": plain_float(grad_norm),
        "completion_len": total_tokens / n_rollouts,
    }


def _all_ranks(world: World, responses: list[ChunkScoreResponse]) -> list[ChunkScoreResponse]:
    """Every rank's responses in rank order (= the 1-process order of the step's rollouts)."""
    return [r for part in world.gather(responses) for r in part]


def chunk_weights(
    cfg: TrainConfig, responses_B: list[ChunkScoreResponse], shape_B_T: tuple, baseline: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_B_T = chunk reward − baseline on each chunk's tokens, chunk_mask_B_T), zeros elsewhere."""
    weights_B_T, chunk_B_T = torch.zeros(shape_B_T), torch.zeros(shape_B_T)
    for b, response in enumerate(responses_B):
        for c in response.chunks:
            weights_B_T[b, c.start : c.end] = chunk_reward(cfg, c) - baseline
            chunk_B_T[b, c.start : c.end] = 1.0
    return weights_B_T, chunk_B_T


def chunk_metrics(responses: list[ChunkScoreResponse], rewards: list[float], prefix: str) -> dict:
    """Mean chunk reward and similarities, the speculative acceptance rate, and the API's bill."""
    chunks = [c for r in responses for c in r.chunks]
    n = max(1, len(chunks))
    chunk_tokens = sum(c.end - c.start for c in chunks)
    usage = [r.usage for r in responses]
    prompt_tokens = sum(u.prompt_tokens for u in usage)
    completion_tokens = sum(u.completion_tokens for u in usage)
    return {
        f"{prefix}reward": sum(rewards) / n,
        f"{prefix}smoothed_reward": sum(c.reward for c in chunks) / n,
        f"{prefix}similarity": sum(c.similarity for c in chunks) / n,
        f"{prefix}edit_similarity": sum(c.edit_similarity for c in chunks) / n,
        f"{prefix}accept_rate": sum(c.accepted_tokens for c in chunks) / max(1, chunk_tokens),
        f"{prefix}chunks": len(chunks),
        "api/requests": sum(u.requests for u in usage),
        "api/retries": sum(u.retries for u in usage),
        "api/prompt_tokens": prompt_tokens,
        "api/completion_tokens": completion_tokens,
        "api/tokens": prompt_tokens + completion_tokens,
    }


def chunk_evaluate(
    lm,
    tokenizer,
    link,
    prompts: list[Prompt],
    cfg: TrainConfig,
    seed: int,
    batch_size: int = 8,
    world: World = SINGLE,
) -> dict[str, float]:
    """Held-out chunk reward: one seeded sample per prompt, chunks spread evenly (the same positions
    whatever the student's entropies), scored by the black-box teacher. Under torchrun each rank samples
    its share of the prompts (eval.eval_share, as eval.evaluate does)."""
    from opd_student.evaluation import eval_seeds, eval_share

    prompts, mine = eval_share(prompts, world)
    was_training = lm.training
    lm.eval()
    responses = []
    tokens = 0
    for start in range(0, len(mine), batch_size):
        chunk_idx = mine[start : start + batch_size]
        chunk = [prompts[i] for i in chunk_idx]
        prompt_ids = [render(p, tokenizer) for p in chunk]
        completions = sample_completions(
            lm,
            prompt_ids,
            1,
            cfg.eval_max_new_tokens,
            1.0,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            row_seeds=eval_seeds(seed, chunk_idx),
        )
        rollouts = [
            Rollout(ids, c[0], None, p.teacher or cfg.teacher_model, p.id)
            for p, ids, c in zip(chunk, prompt_ids, completions, strict=True)
        ]
        requests = chunk_requests(cfg, tokenizer, chunk, rollouts, None)
        responses += link.collect_chunks(requests, link.submit_chunks(requests))
        tokens += sum(len(r.completion_ids) for r in rollouts)
    lm.train(was_training)
    responses = _all_ranks(world, responses)
    rewards = [chunk_reward(cfg, c) for r in responses for c in r.chunks]
    out = chunk_metrics(responses, rewards, "eval/chunk_")
    out = {k.replace("api/", "eval/api_"): v for k, v in out.items()}
    return {**out, "eval/tokens": int(world.sum([tokens])[0]), "eval/prompts": len(prompts)}
