"""`opd bench xtok`: the default student distilled from a teacher with another tokenizer (the embedded
Gemma 3 270M), by opd (`opd train --cross-tokenizer`) and by TRL's GOLDTrainer, on the same budget (the
demo's: 24 steps of 4 prompts × 2 samples, 48 new tokens, AdamW lr 5e-5), measured the same way: the
per-byte held-out reverse KL to the teacher before and after (opd_student.text_evaluation, the same
seeded samples, the same service), wall time per step and the training process's peak RSS.

    .venv/bin/opd bench xtok --out runs/xtok                      # all three arms (~40 min on 2 CPU cores)
    .venv/bin/opd bench xtok --out runs/xtok --only opd --opd-args "--xtok-topk-coef 1"

Writes OUT/table.md and OUT/results.json; each arm keeps its directory (opd: its run directory under
opd/run, GOLD: steps.jsonl, trainer_args.json, final/), with arm.json (exit code, wall time, peak RSS).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from opd_bench.compare.child import log_tail, run_child
from opd_bench.compare.records import STEPS, read_jsonl
from opd_bench.compare.settings import CompareSettings
from opd_common.embedded import GEMMA_TEACHER
from opd_common.launch import start_teacher
from opd_student.metrics_log import read_metrics

# gold: GOLD's defaults for a teacher whose tokenizer is not ByteLevel; gold-eos: the same with both EOS kept
# in the ULD loss (uld_skip_*_eos = False)
ARMS = ("opd", "gold", "gold-eos")
KEY = "eval/reverse_kl_per_byte"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "xtok", help="cross-tokenizer distillation: opd vs TRL's GOLDTrainer (docs/benchmarks.md)"
    )
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/xtok-DATE-TIME)")
    p.add_argument("--only", default=",".join(ARMS), help=f"comma-separated arms of {', '.join(ARMS)}")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument(
        "--teacher", default=GEMMA_TEACHER, help="the teacher (another tokenizer than the student's)"
    )
    p.add_argument("--student", default="default")
    p.add_argument(
        "--opd-args", default="", help="extra `opd train` flags for the opd arm, e.g. the loss terms"
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    out = args.out or Path("runs") / time.strftime("xtok-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    arms = [a.strip() for a in args.only.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"error: --only: unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARMS)}")
    settings = CompareSettings(steps=args.steps, teacher=args.teacher, student=args.student, eval_every=0)
    spec = out / "spec.json"
    settings.save(spec)
    load_before = os.getloadavg()  # a shared machine: the step times say little without it
    teacher = start_teacher(
        out / "teacher", [settings.teacher], extra_args=["--batch-invariant", "--device", "cpu"]
    )
    try:
        for arm in arms:
            print(f"[xtok] {arm}: training", flush=True)
            if arm == "opd":
                result = _run_opd(settings, out, teacher.http_url, args.opd_args)
            else:
                result = _run_gold(spec, out, teacher.http_url, arm)
            (out / arm / "arm.json").write_text(json.dumps(result, indent=2) + "\n")
    finally:
        # opd's teacher is a process of its own (GOLD's is inside its training process): its peak RSS too
        teacher_peak = _peak_rss_bytes(teacher.process.pid)
        teacher.stop()
    rows = [summarise(out, arm) for arm in ARMS if (out / arm / "arm.json").exists()]
    (out / "results.json").write_text(
        json.dumps(
            {
                "settings": settings.to_dict(),
                "arms": rows,
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
                "teacher_service_peak_rss_bytes": teacher_peak,
            },
            indent=2,
        )
        + "\n"
    )
    (out / "table.md").write_text(table(rows))
    print(table(rows))


def _opd_cmd(settings: CompareSettings, run_dir: Path, url: str, extra: str) -> list[str]:
    return [
        sys.executable, "-m", "opd_cli.main", "train", "--teacher-url", url, "--cross-tokenizer",
        "--student", settings.student, "--steps", str(settings.steps),
        "--prompts-per-step", str(settings.prompts_per_step), "--samples-per-prompt", str(settings.samples_per_prompt),
        "--max-new-tokens", str(settings.max_new_tokens), "--micro-batch-size", str(settings.micro_batch_size),
        "--lr", str(settings.lr), "--seed", str(settings.seed), "--save-every", "0",
        "--eval-num-prompts", str(settings.eval_num_prompts), "--eval-max-new-tokens", str(settings.eval_max_new_tokens),
        "--out", str(run_dir), *shlex.split(extra),
    ]  # fmt: skip


def _run_opd(settings: CompareSettings, out: Path, url: str, extra: str) -> dict:
    arm = out / "opd"
    cmd = _opd_cmd(settings, arm / "run", url, extra)
    child = run_child(cmd, arm / "train.log")
    if child.returncode:
        print(log_tail(child.log_path), file=sys.stderr)
    return {"returncode": child.returncode, "wall_s": child.wall_s, "peak_rss_bytes": child.peak_rss_bytes,
            "command": shlex.join(cmd)}  # fmt: skip


def _run_gold(spec: Path, out: Path, url: str, name: str) -> dict:
    arm = out / name
    cmd = [sys.executable, "-m", "opd_bench.xtok.gold_arm", "--spec", str(spec), "--out", str(arm)]
    cmd += ["--keep-eos"] if name == "gold-eos" else []
    child = run_child(cmd, arm / "train.log")
    result = {"returncode": child.returncode, "wall_s": child.wall_s, "peak_rss_bytes": child.peak_rss_bytes,
              "command": shlex.join(cmd)}  # fmt: skip
    if child.returncode:
        print(log_tail(child.log_path), file=sys.stderr)
        return result
    for name, student in (("before", "default"), ("after", str(arm / "final"))):
        ev = [sys.executable, "-m", "opd_bench.xtok.text_eval", "--spec", str(spec), "--teacher-url", url,
              "--student", student, "--json-out", str(arm / f"eval_{name}.json")]  # fmt: skip
        run_child(ev, arm / "eval.log")
    return result


def _peak_rss_bytes(pid: int) -> int | None:
    """A running process's peak resident set (Linux: VmHWM in /proc/PID/status), None where unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def summarise(out: Path, arm: str) -> dict:
    """One table row from an arm's files: its step times, peak RSS and held-out numbers before and after."""
    record = json.loads((out / arm / "arm.json").read_text())
    if arm == "opd":
        metrics = read_metrics(out / arm / "run")
        evals = [m for m in metrics if m.get("eval")]
        steps = [sum(v for k, v in m.items() if k.startswith("time/")) for m in metrics if not m.get("eval")]
        before, after = (evals[0], evals[-1]) if len(evals) >= 2 else ({}, {})
    else:
        steps = [s["time_s"] for s in read_jsonl(out / arm / STEPS)]
        before, after = ({}, {})
        for name in ("before", "after"):
            path = out / arm / f"eval_{name}.json"
            if path.exists():
                value = json.loads(path.read_text())
                before, after = (value, after) if name == "before" else (before, value)
    kl_before, kl_after = _number(before.get(KEY)), _number(after.get(KEY))
    return {
        "arm": arm,
        "returncode": record["returncode"],
        "steps": len(steps),
        "s_per_step": statistics.fmean(steps) if steps else None,
        "s_per_step_median": statistics.median(steps) if steps else None,
        "peak_rss_gib": record["peak_rss_bytes"] / 2**30,
        "kl_per_byte_before": kl_before,
        "kl_per_byte_after": kl_after,
        "change": (kl_after - kl_before) / kl_before if kl_before and kl_after is not None else None,
        "kl_per_answer_after": _number(after.get("eval/reverse_kl_per_answer")),
        "answer_bytes_after": (after["eval/bytes"] / after["eval/prompts"])
        if after.get("eval/prompts")
        else None,
        "command": record.get("command"),
    }


def _number(x) -> float | None:
    """A finite number, else None (a per-byte KL over answers that are all empty is nan)."""
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def table(rows: list[dict]) -> str:
    def num(x, fmt, none="—"):
        return none if x is None else format(x, fmt)

    lines = [
        "| arm | steps | s/step (mean, median) | peak RSS (GiB) | held-out KL per byte, before → after | change "
        "| after: KL per answer, bytes per answer |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        empty = "undefined (every answer empty)" if r["answer_bytes_after"] == 0 else "—"
        lines.append(
            f"| {r['arm']} | {r['steps']} | {num(r['s_per_step'], '.1f')}, {num(r['s_per_step_median'], '.1f')} | "
            f"{num(r['peak_rss_gib'], '.2f')} | {num(r['kl_per_byte_before'], '.4f')} → "
            f"{num(r['kl_per_byte_after'], '.4f', empty)} | {num(r['change'], '+.1%')} | "
            f"{num(r['kl_per_answer_after'], '.2f')}, {num(r['answer_bytes_after'], '.1f')} |"
        )
    return "\n".join(lines) + "\n"
