"""Worker: the per-byte held-out KL of saved students to a teacher with another tokenizer, with the
evaluate_by_text() that `opd train --cross-tokenizer` runs in-process (opd_student.text_evaluation).

    python -m opd_bench.xtok.text_eval --spec SPEC.json --teacher-url URL --student DIR --json-out FILE

Same prompts (the first eval_num_prompts of eval_prompts), same seed (seed + 1234), same max new tokens,
fp32 weights without autocast, the same service: a student's number depends only on its weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from opd_bench.compare.settings import CompareSettings
from opd_bench.compare.trl_arms import device_of


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", type=Path, required=True)
    p.add_argument("--teacher-url", required=True)
    p.add_argument("--student", required=True, help="an HF directory, or 'default'")
    p.add_argument("--json-out", type=Path, required=True)
    args = p.parse_args(argv)
    settings = CompareSettings.load(args.spec)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_student.prompts import load_prompts
    from opd_student.rollout_factory import RolloutFactory
    from opd_student.teacher_link import TeacherLink
    from opd_student.text_evaluation import evaluate_by_text
    from opd_student.tools.make_student import resolve_student

    path = resolve_student(args.student)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:  # as opd train's set-up does
        tokenizer.pad_token_id = tokenizer.eos_token_id
    device = device_of(settings)
    prompts = load_prompts(settings.eval_prompts)[: settings.eval_num_prompts]
    link = TeacherLink(args.teacher_url, None, 120.0, 4, 600.0)
    try:
        link.check(tokenizer, None, allow_other_tokenizer=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
        model.config.use_cache = True  # as opd's load_student; TRL saves its training-time False
        result = evaluate_by_text(
            model,
            tokenizer,
            link,
            prompts,
            RolloutFactory(tokenizer),
            settings.eval_max_new_tokens,
            settings.eval_seed,
        )
    finally:
        link.close()
    args.json_out.write_text(json.dumps({"student": str(path), **result}, indent=2) + "\n")
    print(f"[xtok] {path}: {result['eval/reverse_kl_per_byte']:.4f} nats/byte", flush=True)


if __name__ == "__main__":
    main()
