"""`opd bench scale`: step time and peak memory per rank of `opd train` in one process and under torchrun
with N processes (DDP and FSDP2), with the same global batch, seed and teacher (docs/benchmarks.md).

One teacher service is started and shared by all runs; each run is a fresh `opd train` (or `torchrun ...
-m opd_cli.main train`) subprocess, so every figure comes from the real command line a user would type.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import time
from pathlib import Path

from opd_common.launch import start_teacher
from opd_student.distributed import opd_command
from opd_student.metrics_log import read_metrics


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "scale", help="opd train in 1 process vs N processes (DDP, FSDP2): step time and memory per rank"
    )
    p.add_argument("--procs", type=int, default=2, help="processes of the torchrun runs")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--student", default="default")
    p.add_argument("--prompts-per-step", type=int, default=4, help="global batch: prompts per step")
    p.add_argument("--samples-per-prompt", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--out", type=Path, help="directory for the runs (default: runs/bench-scale-DATE-TIME)")
    p.add_argument("--json-out", type=Path, help="also write the results here")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    out = args.out or Path("runs") / time.strftime("bench-scale-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(16)
    print("starting the teacher service (embedded default teacher)...", flush=True)
    teacher = start_teacher(out / "teacher", api_key=key)
    # (name, processes, parallel, OMP threads per process). torchrun gives each rank one thread; the
    # one-thread single process shows what the thread count alone changes.
    arms = [("1 process", 1, "ddp", None), ("1 process, 1 thread", 1, "ddp", "1")]
    arms += [
        (f"{args.procs} × DDP", args.procs, "ddp", None),
        (f"{args.procs} × FSDP2", args.procs, "fsdp", None),
    ]
    results = []
    try:
        for name, procs, parallel, threads in arms:
            print(f"--- {name}", flush=True)
            run_dir = out / name.replace(" ", "").replace("×", "x").replace(",", "-")
            started = time.perf_counter()
            _train(args, teacher.http_url, key, run_dir, procs, parallel, threads)
            results.append({"arm": name, "wall_s": time.perf_counter() - started, **_summary(run_dir)})
    finally:
        teacher.stop()
    table = render(results, args)
    print(table)
    (out / "table.md").write_text(table + "\n")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")


def _train(args, url: str, key: str, run_dir: Path, procs: int, parallel: str, threads: str | None) -> None:
    cmd = [
        *opd_command(procs), "train", "--teacher-url", url, "--student", args.student, "--out", str(run_dir),
        "--steps", str(args.steps), "--prompts-per-step", str(args.prompts_per_step),
        "--samples-per-prompt", str(args.samples_per_prompt), "--max-new-tokens", str(args.max_new_tokens),
        "--parallel", parallel, "--eval-num-prompts", "8", "--save-every", "0",
    ]  # fmt: skip
    env = {**os.environ, "OPD_TEACHER_API_KEY": key}
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    log = run_dir.with_suffix(".log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        r = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed (exit {r.returncode}); see {log}")


def _summary(run_dir: Path) -> dict:
    """Median wall time between consecutive steps (the first step, which follows the warm-up eval and
    fills the sampling pipeline, is left out), the largest rank's peak memory, the last loss and KL."""
    steps = [r for r in read_metrics(run_dir) if not r.get("eval")]
    gaps = [b["timestamp"] - a["timestamp"] for a, b in zip(steps, steps[1:], strict=False)]
    return {
        "step_s": statistics.median(gaps),
        "peak_mib_per_rank": max(r["mem/peak_mib"] for r in steps),
        "state_mib_per_rank": max(r["mem/state_mib"] for r in steps),
        "tokens_per_step": statistics.mean(r["tokens"] for r in steps),
        "last_kl": steps[-1]["kl/sampled_reverse"],
        "steps": len(steps),
    }


def render(results: list[dict], args) -> str:
    base = results[0]["step_s"]
    lines = [
        f"global batch {args.prompts_per_step} prompts × {args.samples_per_prompt} samples, "
        f"{args.max_new_tokens} new tokens, {args.steps} steps, student {args.student}",
        "",
        "| run | step time (median) | vs 1 process | peak RSS per rank | weights + grads + AdamW per rank "
        "| tokens/step | KL at last step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['arm']} | {r['step_s']:.2f} s | {base / r['step_s']:.2f}× | {r['peak_mib_per_rank']:.0f} MiB "
            f"| {r['state_mib_per_rank']:.0f} MiB | {r['tokens_per_step']:.0f} | {r['last_kl']:.3f} |"
        )
    return "\n".join(lines)
