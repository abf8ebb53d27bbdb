"""Worker: held-out KL of saved students, with the evaluate() that `opd train --eval-every` runs in-process.

    python -m opd_bench.compare.snapshot_eval --spec SPEC.json --teacher-url URL --arm-dir DIR [--keep]
    python -m opd_bench.compare.snapshot_eval --spec SPEC.json --teacher-url URL --initial-out FILE

Same prompts (the first eval_num_prompts of eval_prompts), same seed (seed + 1234), same max new tokens,
fp32 weights without autocast, the same service: an arm's number at a step depends only on its weights
there. With --arm-dir, every snapshot in DIR/snapshots is evaluated into DIR/evals.jsonl and then deleted
(unless --keep); with --initial-out, the untrained student (step 0 of every arm) is.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from opd_bench.compare.records import EVALS, SNAPSHOTS, append_jsonl, snapshot_step
from opd_bench.compare.settings import CompareSettings
from opd_bench.compare.trl_arms import device_of


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", type=Path, required=True)
    p.add_argument("--teacher-url", required=True)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--arm-dir", type=Path)
    target.add_argument("--initial-out", type=Path)
    p.add_argument("--keep", action="store_true", help="keep the snapshots after evaluating them")
    args = p.parse_args(argv)
    settings = CompareSettings.load(args.spec)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_student.evaluation import evaluate
    from opd_student.prompts import load_prompts
    from opd_student.rollout_factory import RolloutFactory
    from opd_student.teacher_heads import TeacherHeads, offers_hidden_states
    from opd_student.teacher_link import TeacherLink
    from opd_student.tools.make_student import resolve_student

    student = resolve_student(settings.student)
    tokenizer = AutoTokenizer.from_pretrained(student)
    if tokenizer.pad_token_id is None:  # as opd train's set-up does
        tokenizer.pad_token_id = tokenizer.eos_token_id
    device = device_of(settings)
    prompts = load_prompts(settings.eval_prompts)[: settings.eval_num_prompts]
    link = TeacherLink(args.teacher_url, None, 120.0, 4, 600.0)
    info = link.check(tokenizer, None)
    # the exact full-vocabulary KLs too, as opd train's own evaluation measures them
    heads = TeacherHeads(link.client, device) if offers_hidden_states(info) else None
    factory = RolloutFactory(tokenizer)  # as `opd train` makes its held-out rollouts (no routing rules here)

    def kl_of(path: Path) -> dict:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
        model.config.use_cache = True  # as opd's load_student; TRL saves its training-time False
        return evaluate(
            model, tokenizer, link, prompts, factory, settings.eval_max_new_tokens, settings.eval_seed,
            heads=heads,
        )  # fmt: skip

    try:
        if args.initial_out:
            result = {"step": 0, **kl_of(student)}
            args.initial_out.write_text(json.dumps(result, indent=2) + "\n")
            print(f"[compare] initial student: KL {result['eval/reverse_kl']:.4f}", flush=True)
            return
        snapshots = sorted((args.arm_dir / SNAPSHOTS).glob("step-*"), key=snapshot_step)
        for path in snapshots:
            result = {"step": snapshot_step(path), **kl_of(path)}
            append_jsonl(args.arm_dir / EVALS, result)
            print(f"[compare] eval at step {result['step']}: KL {result['eval/reverse_kl']:.4f}", flush=True)
            if not args.keep:
                shutil.rmtree(path)
    finally:
        link.close()


if __name__ == "__main__":
    main()
