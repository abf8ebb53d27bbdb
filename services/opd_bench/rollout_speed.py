"""`opd bench rollouts`: the demo's rollout sampling with the student's fp32 weights and with a bf16 copy
(`rollout_dtype = "bfloat16"`), side by side in one run, and what bf16 changes in what gets sampled.

Each round samples the demo's rollouts (`prompts` × `samples` seeded rows of up to `max_new_tokens` tokens, the
trainer's own sample_completions on the default student) once per dtype, alternating, with the same prompts
and seeds; tokens/s per dtype is total generated tokens / total time over the rounds (the first round is a
warm-up and not counted). The sampled distribution: on the bf16 rollouts, a teacher-forced forward of both
weight sets gives the per-token KL(fp32 ‖ bf16) of the next-token distributions (at temperature 1), and the
two dtypes' rollouts under the same seeds (the same Gumbel noise) are compared token by token: the share of
tokens before the first difference.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from opd_common.dataclass_flags import add_dataclass_flags, dataclass_from_args


@dataclass(frozen=True)
class RolloutBenchConfig:
    student: str = "default"  # HF directory, or the default student
    prompts: str = "default-train"
    num_prompts: int = 4  # prompts per round (the demo's prompts_per_step)
    samples: int = 2  # rollouts per prompt (the demo's samples_per_prompt)
    max_new_tokens: int = 48
    rounds: int = 4  # counted rounds per dtype, after one warm-up round
    seed: int = 0
    json_out: str = ""


def run(cfg: RolloutBenchConfig) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_student.prompts import load_prompts, render
    from opd_student.rollouts import row_seed, sample_completions
    from opd_student.sampling_copy import SamplingCopy
    from opd_student.tools.make_student import resolve_student

    path = resolve_student(cfg.student)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    bf16 = SamplingCopy(lm).refreshed()
    prompts = load_prompts(cfg.prompts)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    models = {"fp32": lm, "bf16": bf16}
    seconds = {name: 0.0 for name in models}
    tokens = {name: 0 for name in models}
    same_prefix = compared = 0
    kl_sum, kl_tokens = 0.0, 0
    for r in range(cfg.rounds + 1):
        chosen = [prompts[(r * cfg.num_prompts + i) % len(prompts)] for i in range(cfg.num_prompts)]
        ids_P = [render(p, tokenizer) for p in chosen]
        seeds = [row_seed(cfg.seed, 0, r, i) for i in range(cfg.num_prompts * cfg.samples)]
        rollouts = {}
        for name, model in models.items():
            started = time.perf_counter()
            out = sample_completions(model, ids_P, cfg.samples, cfg.max_new_tokens, 1.0, eos, pad, seeds)
            if r > 0:
                seconds[name] += time.perf_counter() - started
                tokens[name] += sum(len(c) for group in out for c in group)
            rollouts[name] = [c for group in out for c in group]
        rows = [ids for ids in ids_P for _ in range(cfg.samples)]
        for a, b in zip(rollouts["fp32"], rollouts["bf16"], strict=True):
            n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            same_prefix += n
            compared += len(b)
        for ids, completion in zip(rows, rollouts["bf16"], strict=True):
            kl, n = _kl_fp32_bf16(lm, bf16, ids, completion)
            kl_sum += kl
            kl_tokens += n
    speed = {name: tokens[name] / seconds[name] for name in models}
    record = {
        "config": asdict(cfg),
        "tokens_per_s": speed,
        "bf16_over_fp32": speed["bf16"] / speed["fp32"],
        "tokens": tokens,
        "seconds": seconds,
        "kl_fp32_bf16_per_token": kl_sum / max(1, kl_tokens),
        "same_tokens_before_first_difference": same_prefix / max(1, compared),
        "threads": torch.get_num_threads(),
    }
    print(
        f"rollouts: fp32 {speed['fp32']:.1f} tokens/s, bf16 copy {speed['bf16']:.1f} tokens/s "
        f"({record['bf16_over_fp32']:.2f}x); KL(fp32 || bf16) {record['kl_fp32_bf16_per_token']:.2e} nats/token; "
        f"{record['same_tokens_before_first_difference']:.1%} of tokens sampled the same before the first "
        "difference",
        flush=True,
    )
    if cfg.json_out:
        Path(cfg.json_out).write_text(json.dumps(record, indent=2) + "\n")
    return record


@torch.no_grad()
def _kl_fp32_bf16(lm, bf16, prompt: list[int], completion: list[int]) -> tuple[float, int]:
    """Σ_t KL(p_fp32 ‖ p_bf16) of the next-token distributions that sampled `completion`, and its length."""
    ids = torch.tensor([prompt + completion])
    span = slice(len(prompt) - 1, len(prompt) - 1 + len(completion))
    log_p = torch.log_softmax(lm(ids).logits[0, span].float(), -1)
    log_q = torch.log_softmax(bf16(ids).logits[0, span].float(), -1)
    return float((log_p.exp() * (log_p - log_q)).sum()), len(completion)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "rollouts",
        help="rollout sampling speed, fp32 weights against a bf16 copy, and bf16's effect on the samples",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_flags(p, RolloutBenchConfig, defaults_from_cls=True)
    p.set_defaults(func=lambda args: run(dataclass_from_args(RolloutBenchConfig, args)))
