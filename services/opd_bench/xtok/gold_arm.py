"""Worker (one subprocess): TRL's GOLDTrainer, the teacher (another tokenizer) in-process, ULD loss.

    python -m opd_bench.xtok.gold_arm --spec SPEC.json --out DIR

Matched to opd's arm (docs/benchmarks.md lists what is not): the same student and teacher weights, the
same prompts in the same steps (opd's prompt order, G = num_generations samples of each), fully on-policy
(lmbda = 1), pure sampling at temperature 1, the same max new tokens, AdamW at the same constant lr with no
weight decay, grad clip 1.0, the same micro-batch with accumulation to the step's batch, bf16 autocast by
opd's rule, no gradient checkpointing. GOLD's loss for a teacher with another tokenizer is ULD
(use_uld_loss); its byte-offset alignment (use_extended_uld) supports ByteLevel teacher tokenizers only and
raises NotImplementedError for Gemma's SentencePiece-style one, so this arm runs GOLD's documented setting
for such teachers, use_extended_uld = False (positional ULD, Boizard et al.'s original). The final student
is saved for the per-byte evaluation (opd_student.text_evaluation), run afterwards against the service.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from opd_bench.compare.budget import prompt_schedule
from opd_bench.compare.callbacks import StepRecorder
from opd_bench.compare.settings import CompareSettings
from opd_bench.compare.trl_arms import common_args, prompt_field, save_args
from opd_student.prompts import load_prompts

FINAL = "final"


def build_trainer(settings: CompareSettings, out_dir: Path, callbacks, keep_eos: bool = False):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    from opd_common.embedded import resolve_model
    from opd_student.tools.make_student import resolve_student

    student = resolve_student(settings.student)
    teacher_dir = resolve_model(settings.teacher)[0]
    tokenizer = AutoTokenizer.from_pretrained(student, padding_side="left")
    schedule = prompt_schedule(
        load_prompts(settings.train_prompts), settings.seed, settings.steps, settings.prompts_per_step
    )
    # GOLD samples num_generations completions of each row: one row per prompt, in opd's order. Its
    # prompt-completion rows need a completion (only off-policy steps use it; lmbda = 1 has none).
    rows = [
        {"prompt": prompt_field(p), "completion": [{"role": "assistant", "content": "."}]}
        for step in schedule
        for p in step
    ]
    for row in rows:
        if not isinstance(row["prompt"], list):
            raise ValueError("the GOLD arm takes chat prompts (the shipped sets are chats)")
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    args = GOLDConfig(
        **common_args(settings, out_dir),
        max_steps=settings.steps,
        max_completion_length=settings.max_new_tokens,
        num_generations=settings.samples_per_prompt,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        lmbda=1.0,
        use_uld_loss=True,
        use_extended_uld=False,
        teacher_tokenizer_name_or_path=str(teacher_dir),
        # GOLD's default leaves both EOS out of the ULD loss: an answer that is only EOS then costs nothing,
        # and on this pair the student learns exactly that (docs/benchmarks.md). keep_eos scores them.
        uld_skip_student_eos=not keep_eos,
        uld_skip_teacher_eos=not keep_eos,
    )
    return GOLDTrainer(
        model=model,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--keep-eos", action="store_true", help="uld_skip_student_eos = uld_skip_teacher_eos = False"
    )
    args = p.parse_args(argv)
    settings = CompareSettings.load(args.spec)
    args.out.mkdir(parents=True, exist_ok=True)
    recorder = StepRecorder(args.out, settings.steps, set(), lambda step: 0)
    trainer = build_trainer(settings, args.out, [recorder], keep_eos=args.keep_eos)
    save_args(trainer, args.out)
    print(f"[xtok] gold: training {settings.steps} steps", flush=True)
    trainer.train()
    if trainer.state.global_step != settings.steps:
        raise SystemExit(f"gold stopped at step {trainer.state.global_step} of {settings.steps}")
    trainer.model.save_pretrained(args.out / FINAL)  # fp32 master weights
    trainer.processing_class.save_pretrained(args.out / FINAL)


if __name__ == "__main__":
    main()
