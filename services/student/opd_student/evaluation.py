"""KL of the student to the teacher on held-out prompts, measured through the teacher service.

The student answers each prompt (one sample, seeded by the prompt's index, so before/after runs and any
batch size or number of trainer processes see the same noise);
the teacher scores those answers. Two numbers per token, averaged over all completion tokens:
- sampled reverse KL: log q(x) − log p(x) at the student's own samples x ~ q, an unbiased estimate of
  KL(q‖p), the quantity on-policy distillation minimises;
- top-k forward KL: KL(p‖q) on the teacher's top-k plus the tail bucket, a lower bound of KL(p‖q).
When the teacher serves hidden states and its output head, two more: the exact reverse KL(q‖p) and forward
KL(p‖q) over the whole vocabulary at each position (exact_losses.py).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from opd_client.head import TeacherHead
from opd_client.token_bytes import ids_text, vocab_bytes
from opd_student import losses
from opd_student.distributed import SINGLE, World
from opd_student.exact_losses import exact_kls, rows_by_teacher
from opd_student.prompts import Prompt, load_prompts
from opd_student.rollout_factory import RolloutFactory
from opd_student.rollouts import (
    Rollout,
    pack,
    row_seed,
    sample_completions,
    student_logprobs,
    teacher_tensors,
    unwrap,
)
from opd_student.teacher_link import TeacherLink

EVAL_TOP_K = 20


def heldout_rollouts(
    model,
    tokenizer,
    factory: RolloutFactory,
    prompts: list[Prompt],
    max_new_tokens: int,
    seed: int,
    batch_size: int = 8,
    world: World = SINGLE,
) -> Iterator[list[Rollout]]:
    """This rank's held-out rollouts, `batch_size` prompts at a time: one sample per prompt, prompt i's
    seeded by (seed, i), so the numbers do not depend on batch size or rank count. The model is in eval
    mode while the caller consumes them (each batch is sampled after the previous one was used)."""
    prompts, mine = eval_share(prompts, world)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(mine), batch_size):
            part_idx = mine[start : start + batch_size]
            part = [prompts[i] for i in part_idx]
            prompt_ids = [factory.prompt_ids(p) for p in part]
            completions = sample_completions(
                model,
                prompt_ids,
                1,
                max_new_tokens,
                1.0,
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
                row_seeds=eval_seeds(seed, part_idx),
            )
            yield [
                r
                for p, ids, c in zip(part, prompt_ids, completions, strict=True)
                for r in factory.group(p, ids, c)
            ]
    finally:
        model.train(was_training)


def evaluate(
    model,
    tokenizer,
    link: TeacherLink,
    prompts: list[Prompt],
    factory: RolloutFactory,
    max_new_tokens: int,
    seed: int = 1234,
    batch_size: int = 8,
    autocast: bool = False,
    world: World = SINGLE,
    heads: Callable[[str | None], TeacherHead] | None = None,
) -> dict[str, float]:
    """Sums over all ranks when several trainer processes share the prompts; every rank gets the result.
    Each rollout is scored by the teacher it routes to, after the context training gives it (factory).
    With `heads` (teacher name → its output head) the exact full-vocabulary KLs are measured too."""
    rev_sum = fwd_sum = exact_rev_sum = exact_fwd_sum = tokens = num_bytes = 0.0
    device_type = unwrap(model).device.type
    vocab = vocab_bytes(tokenizer)
    for rollouts in heldout_rollouts(
        model, tokenizer, factory, prompts, max_new_tokens, seed, batch_size, world
    ):
        options: dict[str, Any] = {"return_hidden": True} if heads is not None else {}
        scores = link.collect(link.submit(rollouts, EVAL_TOP_K, **options))
        batch = pack(rollouts, tokenizer.pad_token_id)
        teacher = teacher_tensors(scores, batch.mask_B_T.shape[1])
        with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            logprobs_B_T_V = student_logprobs(model, batch)
        logprobs_B_T_V = logprobs_B_T_V.float().cpu()
        q_tok_B_T = logprobs_B_T_V.gather(-1, batch.targets_B_T[..., None])[..., 0]
        rev_sum += (
            losses.sampled_reverse_kl(q_tok_B_T, teacher.token_logprobs_B_T, batch.mask_B_T).sum().item()
        )
        fwd_sum += (
            losses.topk_forward_kl(
                logprobs_B_T_V,
                teacher.top_ids_B_T_K,
                teacher.top_logprobs_B_T_K,
                teacher.tail_logprob_B_T,
                batch.mask_B_T,
            )
            .sum()
            .item()
        )
        if heads is not None:
            hidden_B_T_D = teacher.hidden_B_T_D
            assert hidden_B_T_D is not None, "asked with return_hidden"
            teachers_B = [r.teacher for r in rollouts]
            for name, rows in rows_by_teacher(teachers_B):  # each teacher's rows against its own head
                sel = slice(None) if rows is None else rows
                reverse_B_T, forward_B_T = exact_kls(
                    logprobs_B_T_V[sel], hidden_B_T_D[sel], heads(name), batch.mask_B_T[sel]
                )
                exact_rev_sum += reverse_B_T.sum().item()
                exact_fwd_sum += forward_B_T.sum().item()
        tokens += batch.num_tokens
        # the completions' UTF-8 bytes: the per-byte KL compares with teachers of other tokenizers
        num_bytes += sum(len(ids_text(r.completion_ids, vocab)[0].encode()) for r in rollouts)
    rev_sum, fwd_sum, exact_rev_sum, exact_fwd_sum, tokens, num_bytes = world.sum(
        [rev_sum, fwd_sum, exact_rev_sum, exact_fwd_sum, tokens, num_bytes]
    )
    out = {
        "eval/reverse_kl": rev_sum / tokens,
        "eval/topk_forward_kl": fwd_sum / tokens,
        "eval/tokens": int(tokens),
        "eval/prompts": len(eval_share(prompts, world)[0]),
        # Σ (log q − log p) over the completions' bytes: text_evaluation.py's measure for a teacher with
        # another tokenizer, so runs of both kinds compare
        "eval/reverse_kl_per_byte": rev_sum / num_bytes if num_bytes else math.nan,  # nan: every answer empty
        "eval/bytes": int(num_bytes),
    }
    if heads is not None:
        out["eval/exact_reverse_kl"] = exact_rev_sum / tokens
        out["eval/exact_forward_kl"] = exact_fwd_sum / tokens
    return out


def eval_summary(result: dict) -> str:
    """The held-out numbers in one line."""
    text = f"sampled reverse KL {result['eval/reverse_kl']:.4f}"
    if "eval/exact_reverse_kl" in result:
        text += f", exact reverse KL {result['eval/exact_reverse_kl']:.4f}"
        text += f", exact forward KL {result['eval/exact_forward_kl']:.4f}"
    return text + f", top-{EVAL_TOP_K} forward KL {result['eval/topk_forward_kl']:.4f} nats/token"


def eval_share(prompts: list[Prompt], world: World) -> tuple[list[Prompt], list[int]]:
    """The prompts all ranks evaluate, cut to a multiple of the rank count (equal shares: every rank runs
    the same number of lockstep forwards), and the indices of this rank's share."""
    if world.distributed and len(prompts) % world.size:
        prompts = prompts[: len(prompts) - len(prompts) % world.size]
    return prompts, list(world.share(len(prompts)))


def eval_seeds(seed: int, prompt_indices: list[int]) -> list[int]:
    """One sampling seed per held-out prompt, by its index in the prompt list."""
    return [row_seed(seed, 1, i) for i in prompt_indices]


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="KL of a student to the teacher on held-out prompts")
    p.add_argument("--teacher-url", required=True)
    p.add_argument("--teacher-model", help="teacher name on the service (default: its first)")
    p.add_argument("--api-key-env", default="OPD_TEACHER_API_KEY", help="env var holding the API key")
    p.add_argument("--student", default="default", help="HF directory, or 'default'")
    p.add_argument("--prompts", default="default-heldout", help="JSONL prompt file or a shipped set")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="auto")
    p.add_argument("--json-out", type=Path, help="also write the numbers here")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_student.student_model import pick_device
    from opd_student.tools.make_student import resolve_student

    path = resolve_student(args.student)
    device = pick_device(args.device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    from opd_student.teacher_heads import TeacherHeads, offers_hidden_states

    link = TeacherLink(args.teacher_url, os.environ.get(args.api_key_env), 120.0, 4, 600.0)
    info = link.check(tokenizer, args.teacher_model)
    prompts = load_prompts(args.prompts)[: args.num_prompts]
    factory = RolloutFactory(tokenizer, args.teacher_model)
    heads = TeacherHeads(link.client, device) if offers_hidden_states(info) else None
    result = evaluate(model, tokenizer, link, prompts, factory, args.max_new_tokens, args.seed, heads=heads)
    link.close()
    lines = [f"student {path}", f"  sampled reverse KL  {result['eval/reverse_kl']:.4f} nats/token"]
    if heads is not None:
        lines.append(
            f"  exact reverse KL    {result['eval/exact_reverse_kl']:.4f} nats/token (full vocabulary)"
        )
        lines.append(
            f"  exact forward KL    {result['eval/exact_forward_kl']:.4f} nats/token (full vocabulary)"
        )
    lines.append(f"  top-{EVAL_TOP_K} forward KL   {result['eval/topk_forward_kl']:.4f} nats/token")
    lines.append(f"  over {int(result['eval/tokens'])} tokens of {len(prompts)} prompts")
    print("\n".join(lines))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
