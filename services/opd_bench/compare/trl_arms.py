"""Worker (one subprocess per run): TRL's DistillationTrainer with the teacher in-process, or TRL's
ServerDistillationTrainer against the shared opd teacher service.

    python -m opd_bench.compare.trl_arms --spec SPEC.json --arm trl-distill --out DIR [--teacher-url URL]

Settings matched to the opd arms (docs/compare.md lists what is not): the same student and teacher, the same
prompts in the same steps (opd's prompt order, each prompt repeated G times in a row, no shuffling), fully
on-policy (TRL 1.16's trainers have no off-policy mixing: every step samples from the current student),
pure sampling at temperature 1, the same max new tokens, AdamW at the same constant lr with no weight decay,
grad clip 1.0, the same micro-batch with gradient accumulation to the step's batch, bf16 autocast under the
same rule as opd's `bf16=auto`, no gradient checkpointing (opd does not checkpoint; TRL's default is on).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from opd_bench.compare.budget import eval_points, prompt_schedule, repeated_rows
from opd_bench.compare.callbacks import StepRecorder
from opd_bench.compare.settings import JSD_BETA, TRL_SERVER_BETA, TRL_SERVER_TOP_K, CompareSettings
from opd_student.prompts import Prompt, load_prompts

TRAINER_ARGS = "trainer_args.json"


def device_of(settings: CompareSettings) -> torch.device:
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


def use_bf16(device: torch.device) -> bool:
    """opd's bf16=auto rule (student_model.use_bf16): autocast on CPU and on CUDA with bf16 support."""
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())


def common_args(settings: CompareSettings, out_dir: Path) -> dict:
    """TrainingArguments every TRL arm shares (SFT included)."""
    device = device_of(settings)
    return dict(
        output_dir=str(out_dir / "trl"),
        per_device_train_batch_size=settings.micro_batch,
        gradient_accumulation_steps=settings.accumulation_steps,
        learning_rate=settings.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,  # HF's default AdamW weight decay is 0.01 here; opd uses 0
        max_grad_norm=1.0,
        bf16=use_bf16(device),
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=device.type == "cpu",
        seed=settings.seed,
        shuffle_dataset=False,
        dataloader_num_workers=0,
    )


def prompt_field(prompt: Prompt):
    """What TRL's "prompt" column holds: the chat messages (TRL applies the chat template with the
    generation prompt, giving the same ids as opd's render) or the plain text."""
    if prompt.teacher_messages is not None or prompt.teacher is not None:
        raise ValueError(f"prompt {prompt.id!r}: privileged context and teacher routing are opd-only")
    return prompt.messages if prompt.messages is not None else prompt.prompt


class CountTeacherTokens:
    """Mixin: counts the completion tokens of every generation batch, i.e. the positions the teacher is
    asked about (TRL's own logic is untouched)."""

    teacher_tokens = 0

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.teacher_tokens += int(output["completion_mask"].sum().item())
        return output


def build_trainer(settings: CompareSettings, arm: str, out_dir: Path, teacher_url: str | None, callbacks):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_common.embedded import resolve_model
    from opd_student.tools.make_student import resolve_student

    student = resolve_student(settings.student)
    tokenizer = AutoTokenizer.from_pretrained(student, padding_side="left")
    schedule = prompt_schedule(
        load_prompts(settings.train_prompts), settings.seed, settings.steps, settings.prompts_per_step
    )
    rows = repeated_rows(schedule, settings.samples_per_prompt)
    dataset = Dataset.from_list([{"prompt": prompt_field(p)} for p in rows])
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    shared = dict(
        **common_args(settings, out_dir),
        max_steps=settings.steps,
        max_completion_length=settings.max_new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
    )
    if arm == "trl-distill":
        from trl import DistillationConfig, DistillationTrainer

        class CountingDistillationTrainer(CountTeacherTokens, DistillationTrainer):
            pass

        teacher = AutoModelForCausalLM.from_pretrained(
            resolve_model(settings.teacher)[0], dtype=torch.float32
        )
        args = DistillationConfig(**shared, beta=JSD_BETA)
        return CountingDistillationTrainer(
            model=model,
            teacher_model=teacher,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    if arm == "trl-server":
        from trl.experimental.server_distillation import ServerDistillationConfig, ServerDistillationTrainer
        from trl.generation import vllm_client

        # VLLMClient refuses to start unless vLLM is importable (it is not needed to talk to a server, and
        # not installable on a CPU-only machine): that one check is answered yes, as in tests/test_trl_compat.py.
        vllm_client.is_vllm_available = lambda *args, **kwargs: True

        class CountingServerDistillationTrainer(CountTeacherTokens, ServerDistillationTrainer):
            pass

        args = ServerDistillationConfig(
            **shared,
            teacher_model_server_url=teacher_url,
            beta=TRL_SERVER_BETA,
            loss_top_k=TRL_SERVER_TOP_K,
        )
        return CountingServerDistillationTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks
        )
    raise ValueError(f"not a TRL distillation arm: {arm}")


def save_args(trainer, out_dir: Path) -> None:
    """The trainer's full TrainingArguments as TRL resolved them, for the record."""
    (out_dir / TRAINER_ARGS).write_text(trainer.args.to_json_string())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", type=Path, required=True)
    p.add_argument("--arm", required=True, choices=["trl-distill", "trl-server"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--teacher-url")
    args = p.parse_args(argv)
    settings = CompareSettings.load(args.spec)
    args.out.mkdir(parents=True, exist_ok=True)
    recorder = StepRecorder(
        args.out, settings.steps, set(eval_points(settings.steps, settings.eval_every)) - {0}, lambda step: 0
    )
    trainer = build_trainer(settings, args.arm, args.out, args.teacher_url, [recorder])
    recorder.teacher_tokens = lambda step: trainer.teacher_tokens
    save_args(trainer, args.out)
    print(f"[compare] {args.arm}: training {settings.steps} steps", flush=True)
    trainer.train()
    if trainer.state.global_step != settings.steps:
        raise SystemExit(f"{args.arm} stopped at step {trainer.state.global_step} of {settings.steps}")


if __name__ == "__main__":
    main()
