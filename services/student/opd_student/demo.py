"""`opd demo`: the main job on the embedded defaults, start to finish on a laptop-class CPU.

Starts the default teacher as a separate service process, makes (or reuses) the default layer-pruned
student, measures its KL to the teacher on held-out prompts, distils on-policy, measures again, and
writes the report.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from opd_student.config import LOSSES, TrainConfig

# Settings that finish in about 5-7 minutes on 2 CPU cores (measured: docs/benchmarks.md). The loss is the
# signal that brought the held-out KL lowest in the demo's time, measured with two seeds: the exact reverse
# KL over the full vocabulary (the teacher's hidden states and head), −39 % and −41 %, where the sampled
# token's logprob (reverse_kl, the default before) gave −35 % and −33 %.
DEMO = dict(
    steps=24,
    prompts_per_step=4,
    samples_per_prompt=2,
    max_new_tokens=48,
    loss="exact_reverse_kl",
    lr=5e-5,
    save_every=8,
    eval_num_prompts=32,
    eval_max_new_tokens=48,
)


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="distil the default student from the default teacher, end to end")
    p.add_argument("--steps", type=int, default=DEMO["steps"], help="optimizer steps (default: %(default)s)")
    p.add_argument(
        "--loss",
        default=DEMO["loss"],
        choices=[loss for loss in LOSSES if loss != "chunk"],
        help="the teacher signal (default: %(default)s; docs/training.md)",
    )
    p.add_argument("--lr", type=float, default=DEMO["lr"], help="learning rate (default: %(default)s)")
    p.add_argument("--out", type=Path, help="run directory (default: runs/demo-DATE-TIME)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
    p.add_argument("--teacher-url", help="use this running teacher instead of starting one")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    from opd_student.metrics_log import read_metrics
    from opd_student.tools.report import write_report
    from opd_student.train import train

    if args.resume and not args.out:
        raise SystemExit("error: --resume needs --out RUN_DIR (the demo to continue)")
    out = args.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    try:
        cfg = TrainConfig(
            **{
                **DEMO,
                "steps": args.steps,
                "loss": args.loss,
                "lr": args.lr,
                "out": str(out),
                "teacher_url": args.teacher_url,
            }
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    started = time.perf_counter()
    run_dir = train(cfg, resume=args.resume)
    evals = [r for r in read_metrics(run_dir) if r.get("eval")]
    png, md = write_report(run_dir)
    minutes = (time.perf_counter() - started) / 60
    if len(evals) >= 2:
        before, after = evals[0]["eval/reverse_kl"], evals[-1]["eval/reverse_kl"]
        print(
            f"\nKL to teacher: {before:.3f} → {after:.3f} nats/token "
            f"({100 * (after - before) / before:+.0f}%; sampled reverse KL on "
            f"{int(evals[-1]['eval/prompts'])} held-out prompts)"
        )
        if "eval/exact_reverse_kl" in evals[0]:
            before, after = evals[0]["eval/exact_reverse_kl"], evals[-1]["eval/exact_reverse_kl"]
            print(
                f"exact reverse KL over the full vocabulary: {before:.3f} → {after:.3f} nats/token "
                f"({100 * (after - before) / before:+.0f}%)"
            )
    print(f"report: {png} and {md}; run directory {run_dir} ({minutes:.1f} min)")
