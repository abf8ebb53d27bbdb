"""`opd bench train-memory`: the trainer's peak memory with each loss, side by side in one run.

Each loss trains the same student for a few steps with the same settings (the demo's rollouts, one shared
teacher service started here), each `opd train` in its own process, so one loss's peak cannot hide inside
another's. The peak is the trainer's own `mem/peak_mib` (the process's RSS high-water mark on CPU, torch's
max allocated memory on CUDA), the largest over its steps. The exact losses' peak is compared with the
top-k loss's plus the size of the teacher's head as the trainer holds it (fp32 on the student's device).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from opd_common.embedded import DEFAULT_TEACHER
from opd_common.launch import start_teacher

SETTINGS = [
    "--prompts-per-step", "4", "--samples-per-prompt", "2", "--max-new-tokens", "48",
    "--eval-num-prompts", "4", "--eval-max-new-tokens", "8", "--save-every", "0", "--seed", "0",
]  # fmt: skip


def peak_of(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(r["mem/peak_mib"] for r in records if not r.get("eval"))


def head_mib(teacher_url: str, api_key: str | None) -> float:
    """The teacher's head as the exact losses hold it: V × D fp32 (+ bias)."""
    from opd_client.http_client import HttpTeacherClient

    with HttpTeacherClient(teacher_url, api_key=api_key) as client:
        info = client.models()[0]
    return info.vocab_size * (info.hidden_size or 0) * 4 / 2**20


def main(args: argparse.Namespace) -> int:
    losses = [loss.strip() for loss in args.losses.split(",")]
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="opd-bench-train-memory-") as tmp,
        start_teacher(Path(tmp), [args.model], api_key="bench-key") as teacher,
    ):
        head = head_mib(teacher.http_url, teacher.api_key)
        for loss in losses:
            out = Path(tmp) / loss
            cmd = [sys.executable, "-m", "opd_cli.main", "train", "--teacher-url", teacher.http_url,
                   "--loss", loss, "--steps", str(args.steps), "--out", str(out), *SETTINGS]  # fmt: skip
            env = {**os.environ, "OPD_TEACHER_API_KEY": teacher.api_key}
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode != 0:
                print(r.stdout[-2000:] + r.stderr[-2000:], file=sys.stderr)
                return 1
            rows.append({"loss": loss, "peak_mib": round(peak_of(out), 1)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"steps": args.steps, "head_mib": round(head, 1), "runs": rows}
    print(format_table(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def format_table(result: dict) -> str:
    lines = ["| loss | trainer peak MiB |", "|---|---:|"]
    lines += [f"| {r['loss']} | {r['peak_mib']:.0f} |" for r in result["runs"]]
    lines.append(f"\nthe teacher's head as the trainer holds it (fp32): {result['head_mib']:.0f} MiB")
    return "\n".join(lines)


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "train-memory", help="the trainer's peak memory with each loss (docs/benchmarks.md)"
    )
    p.add_argument("--model", default=DEFAULT_TEACHER, help="the teacher (embedded name or HF directory)")
    p.add_argument("--losses", default="jsd,exact_jsd,reverse_kl,exact_reverse_kl")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json-out", type=Path)
    p.set_defaults(func=main)
