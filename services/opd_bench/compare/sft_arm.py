"""Worker: supervised fine-tuning on teacher samples, with the teacher-token budget of the opd arm.

    python -m opd_bench.compare.sft_arm --spec SPEC.json --out DIR --budget TOKENS

1. The teacher (the same weights the service serves, float32, loaded here and freed before training)
   samples completions for the training prompts in opd's order, step by step, batched as opd samples its
   student: the step's prompts x G samples, left-padded, pure sampling at temperature 1, the same max new
   tokens, cut after EOS. It stops once the completions add up to the budget; the last one is cut so the
   total is exactly the budget (budget.fit_to_budget).
2. TRL's SFTTrainer trains one pass over them, in that order, at the step batch of the other arms (the
   last step may be short): loss on completion tokens only, token-mean over the step, the same optimiser
   settings as every arm (trl_arms.common_args).
The sampling time is this arm's data time and counts in its total wall time.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from opd_bench.compare.budget import eval_points, fit_to_budget, steps_for
from opd_bench.compare.callbacks import StepRecorder
from opd_bench.compare.records import ARM
from opd_bench.compare.settings import CompareSettings
from opd_bench.compare.trl_arms import common_args, device_of, save_args
from opd_student.prompts import PromptStream, load_prompts, render


@torch.inference_mode()
def sample(model, rows: list[list[int]], max_new_tokens: int, eos_token_id: int, pad_token_id: int):
    """One completion per row (pure sampling, temperature 1), cut after the first EOS."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):  # left padding: every row's next token comes at the same column
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention_mask[i, width - len(ids) :] = 1
    out = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )[:, width:].tolist()
    return [row[: row.index(eos_token_id) + 1] if eos_token_id in row else row for row in out]


def teacher_samples(settings: CompareSettings, teacher, tokenizer) -> Iterator[tuple[list[int], list[int]]]:
    """(prompt_ids, completion_ids), G per prompt, one step's prompts per batch, in opd's order; endless."""
    stream = PromptStream(load_prompts(settings.train_prompts), seed=settings.seed)
    torch.manual_seed(settings.seed)
    while True:
        prompt_ids = [render(p, tokenizer) for p in stream.take(settings.prompts_per_step)]
        rows = [ids for ids in prompt_ids for _ in range(settings.samples_per_prompt)]
        completions = sample(
            teacher, rows, settings.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id
        )
        yield from zip(rows, completions, strict=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget", type=int, required=True, help="teacher tokens (completion tokens) to use")
    args = p.parse_args(argv)
    settings = CompareSettings.load(args.spec)
    args.out.mkdir(parents=True, exist_ok=True)

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from opd_common.embedded import resolve_model
    from opd_student.tools.make_student import resolve_student

    student = resolve_student(settings.student)
    tokenizer = AutoTokenizer.from_pretrained(student)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id

    print(f"[compare] sft: sampling {args.budget} teacher tokens", flush=True)
    started = time.perf_counter()
    teacher = AutoModelForCausalLM.from_pretrained(resolve_model(settings.teacher)[0], dtype=torch.float32)
    teacher = teacher.to(device_of(settings)).eval()
    samples = fit_to_budget(teacher_samples(settings, teacher, tokenizer), args.budget)
    data_time_s = time.perf_counter() - started
    del teacher
    gc.collect()
    per_step = settings.rollouts_per_step
    steps = steps_for(len(samples), per_step)
    # cumulative teacher tokens after each step (the trainer reads the data in this order)
    lengths = [len(c) for _, c in samples]
    cumulative = [sum(lengths[: k * per_step]) for k in range(steps + 1)]
    (args.out / ARM).write_text(
        json.dumps({"data_time_s": data_time_s, "sequences": len(samples), "steps": steps}, indent=2) + "\n"
    )
    print(
        f"[compare] sft: {len(samples)} teacher samples, {sum(lengths)} tokens in {data_time_s:.0f} s; "
        f"training {steps} steps",
        flush=True,
    )

    dataset = Dataset.from_list(
        [
            {"input_ids": p_ids + c_ids, "completion_mask": [0] * len(p_ids) + [1] * len(c_ids)}
            for p_ids, c_ids in samples
        ]
    )
    config = SFTConfig(
        **common_args(settings, args.out),
        num_train_epochs=1,
        completion_only_loss=True,
        train_sampling_strategy="sequential",
        max_length=None,
        packing=False,
    )
    recorder = StepRecorder(
        args.out, steps, set(eval_points(steps, settings.eval_every)) - {0}, lambda step: cumulative[step]
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[recorder],
    )
    save_args(trainer, args.out)
    trainer.train()
    if trainer.state.global_step != steps:
        raise SystemExit(f"sft stopped at step {trainer.state.global_step} of {steps}")


if __name__ == "__main__":
    main()
