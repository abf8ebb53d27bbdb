"""`opd bench compare`: opd's losses against TRL's distillation trainers and SFT on teacher samples.

One teacher service (no API key: TRL's VLLMClient cannot send one) serves the opd arms, TRL's server arm
and every evaluation. Each training run is its own subprocess, one after another, so
its peak RSS and its timings are its own. Outputs in --out: results.json, table.md, kl_vs_time.png,
kl_vs_teacher_tokens.png, and one directory per arm (docs/compare.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from opd_bench.compare import opd_arm
from opd_bench.compare.child import ChildResult, log_tail, run_child
from opd_bench.compare.records import ARM, EVALS, STEPS, append_jsonl, read_jsonl
from opd_bench.compare.results import TABLE, hardware, versions, write_outputs
from opd_bench.compare.settings import ARM_NAMES, Arm, CompareSettings, select_arms

SPEC = "spec.json"
INITIAL_EVAL = "initial_eval.json"
# What could not be matched between the arms (docs/compare.md explains each).
KNOWN_DIFFERENCES = [
    "opd samples the next step's rollouts while the teacher scores the current ones (its default "
    "max_staleness=1: a step's rollouts may come from the policy one step old); TRL's trainers sample "
    "every step from the current policy.",
    "opd-jsd uses the teacher's top-20 + a tail bucket (what the service returns); TRL's "
    "DistillationTrainer computes JSD over the full vocabulary with the teacher in its own process.",
    "TRL's trainers sample their rollouts through the bf16-autocast forward accelerate installs; opd "
    "samples in float32 and uses bf16 autocast for the loss forward only.",
    "TRL's in-process teacher runs inside the trainer's bf16 autocast; the service's teacher (opd arms, "
    "trl-server, all evaluation) and the teacher sampling SFT's data run in float32.",
    "trl-server: ServerDistillationTrainer allows only top-1 support for beta > 0, so it runs beta=1 "
    "(reverse KL on the sampled token plus a tail bucket, an exact gradient of a 2-bucket KL) where "
    "opd-rkl uses the policy-gradient estimator of the full reverse KL on the same teacher numbers.",
    "trl-server normalises the loss per micro-batch (TRL: gradient-accumulation normalisation of the "
    "server path is a follow-up); opd and the other TRL arms normalise by the step's tokens.",
    "sft sees the teacher's own samples (off-policy for the student) with the same teacher-token budget "
    "as opd-rkl; it may take a different number of steps (same sequences per step, the last one short).",
    "The random streams differ between tools (sampling seeds), so single runs carry sampling noise.",
]


def register(bench_subparsers) -> None:
    d = CompareSettings()
    p = bench_subparsers.add_parser(
        "compare", help="opd vs TRL's distillation trainers vs SFT, same budget (docs/compare.md)"
    )
    for f in dataclasses.fields(CompareSettings):
        default = getattr(d, f.name)
        p.add_argument(
            "--" + f.name.replace("_", "-"), type=type(default), default=default, help=f"(default: {default})"
        )
    p.add_argument("--out", type=Path, help="run directory (default: runs/compare-DATE-TIME)")
    p.add_argument("--only", help=f"comma-separated arms to run (default: all of {', '.join(ARM_NAMES)})")
    p.add_argument(
        "--keep-snapshots", action="store_true", help="keep the evaluated students (about 400 MB each)"
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        settings = CompareSettings(
            **{f.name: getattr(args, f.name) for f in dataclasses.fields(CompareSettings)}
        )
        arms = select_arms(args.only)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if any(a.kind != "opd" for a in arms):
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit("error: the TRL arms need trl==1.16.0 (scripts/setup.sh --dev)") from None
    out = args.out or Path("runs") / time.strftime("compare-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    settings.save(out / SPEC)
    (out / INITIAL_EVAL).unlink(missing_ok=True)
    return run(settings, arms, out, args.keep_snapshots)


def run(settings: CompareSettings, arms: list[Arm], out: Path, keep: bool) -> int:
    from opd_common.launch import start_teacher
    from opd_student.tools.make_student import resolve_student

    started = time.perf_counter()
    print(f"opd bench compare: {', '.join(a.name for a in arms)} -> {out}", flush=True)
    resolve_student(settings.student)  # made once here (first use), not inside an arm
    print("starting the teacher service (no API key)...", flush=True)
    # batch-invariant: a sequence's scores do not depend on what the service batches with it, so the
    # teacher signal (and every evaluation) reproduces from run to run
    teacher = start_teacher(
        out / "teacher", [settings.teacher], api_key=None, extra_args=["--batch-invariant"]
    )
    failed: list[str] = []
    try:
        for i, arm in enumerate(arms, 1):
            print(f"\n[{i}/{len(arms)}] {arm.name}: {arm.tool}, {arm.loss}", flush=True)
            if not run_arm(settings, arm, out, teacher.http_url, keep):
                failed.append(arm.name)
    finally:
        teacher.stop()
    done = [a.name for a in arms if a.name not in failed]
    meta = {
        "settings": settings.to_dict(),
        "versions": versions(),
        "hardware": hardware(),
        "known_differences": KNOWN_DIFFERENCES,
        "failed": failed,
        "bench_wall_s": time.perf_counter() - started,
    }
    if done:
        write_outputs(out, done, meta)
        print("\n" + (out / TABLE).read_text(), flush=True)
    print(f"results in {out} ({(time.perf_counter() - started) / 60:.1f} min)", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)} (logs in their directories)", file=sys.stderr)
        return 1
    return 0


def run_arm(settings: CompareSettings, arm: Arm, out: Path, url: str, keep: bool) -> bool:
    arm_dir = out / arm.name
    shutil.rmtree(arm_dir, ignore_errors=True)
    arm_dir.mkdir(parents=True)
    spec = out / SPEC
    py = [sys.executable, "-m"]
    extra: dict = {}
    if arm.kind == "opd":
        cmd = opd_arm.command(settings, arm.name, url, arm_dir)
        progress = _follow(arm_dir / "train.log", _opd_progress(arm_dir, settings.steps, arm.name))
    elif arm.kind == "sft":
        budget, source = sft_budget(settings, out)
        extra = {"budget": budget, "budget_source": source}
        print(f"  teacher-token budget {budget} ({source})", flush=True)
        cmd = py + ["opd_bench.compare.sft_arm", "--spec", str(spec), "--out", str(arm_dir)]
        cmd += ["--budget", str(budget)]
        progress = _follow(arm_dir / "train.log")
    else:
        cmd = py + ["opd_bench.compare.trl_arms", "--spec", str(spec), "--arm", arm.name]
        cmd += ["--out", str(arm_dir), "--teacher-url", url]
        progress = _follow(arm_dir / "train.log")
    result = run_child(cmd, arm_dir / "train.log", progress)
    _write_meta(arm_dir, result, cmd, extra)
    if result.returncode != 0:
        print(f"  {arm.name} failed (exit {result.returncode}):\n{log_tail(result.log_path)}", flush=True)
        return False
    print(
        f"  done in {result.wall_s:.0f} s (process), peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB",
        flush=True,
    )
    if arm.kind == "opd":
        opd_arm.read_back(arm_dir)
        opd_arm.cleanup(arm_dir, keep_final=keep)
        return True
    return evaluate_snapshots(settings, out, arm_dir, url, keep)


def evaluate_snapshots(settings: CompareSettings, out: Path, arm_dir: Path, url: str, keep: bool) -> bool:
    """Step 0 (the untrained student, evaluated once for all non-opd arms) and the arm's snapshots."""
    base = [sys.executable, "-m", "opd_bench.compare.snapshot_eval", "--spec", str(out / SPEC)]
    base += ["--teacher-url", url]
    log = arm_dir / "eval.log"
    initial = out / INITIAL_EVAL
    if not initial.exists():
        print("  evaluating the untrained student (step 0 of the non-opd arms)", flush=True)
        r = run_child(base + ["--initial-out", str(initial)], log, _follow(log))
        if r.returncode != 0:
            print(f"  evaluation failed:\n{log_tail(log)}", flush=True)
            return False
    append_jsonl(arm_dir / EVALS, json.loads(initial.read_text()))
    print("  evaluating the snapshots", flush=True)
    r = run_child(base + ["--arm-dir", str(arm_dir)] + (["--keep"] if keep else []), log, _follow(log))
    if r.returncode != 0:
        print(f"  evaluation failed:\n{log_tail(log)}", flush=True)
    return r.returncode == 0


def sft_budget(settings: CompareSettings, out: Path) -> tuple[int, str]:
    """The teacher tokens opd-rkl used in this run directory; without that arm, the most any on-policy arm
    could use (steps x rollouts x max new tokens)."""
    steps = read_jsonl(out / "opd-rkl" / STEPS)
    if steps:
        return sum(r["teacher_tokens"] for r in steps), "teacher tokens of opd-rkl"
    nominal = settings.steps * settings.rollouts_per_step * settings.max_new_tokens
    return nominal, "nominal: no opd-rkl run in this directory, steps x rollouts x max_new_tokens"


def _write_meta(arm_dir: Path, result: ChildResult, cmd: list[str], extra: dict) -> None:
    path = arm_dir / ARM
    meta = json.loads(path.read_text()) if path.exists() else {}  # SFT writes its data time there
    meta.update(
        returncode=result.returncode,
        peak_rss_bytes=result.peak_rss_bytes,
        process_wall_s=result.wall_s,
        command=[str(c) for c in cmd],
        **extra,
    )
    path.write_text(json.dumps(meta, indent=2) + "\n")


def _opd_progress(arm_dir: Path, total: int, name: str) -> Callable[[], str | None]:
    """progress(): "step k/N" when opd's metrics.jsonl has new train records."""
    last = [0]

    def progress() -> str | None:
        n = opd_arm.progress_count(arm_dir)
        if n == last[0]:
            return None
        last[0] = n
        return f"  {name}: step {n}/{total}"

    return progress


def _follow(log: Path, extra: Callable[[], str | None] | None = None) -> Callable[[], str | None]:
    """progress(): the new "[compare]" and "eval at step" lines of a child's log (and extra())."""
    offset = [log.stat().st_size if log.exists() else 0]

    def progress() -> str | None:
        lines = []
        if log.exists():
            with open(log, "rb") as f:
                f.seek(offset[0])
                chunk = f.read()
            end = chunk.rfind(b"\n") + 1  # whole lines only
            offset[0] += end
            for raw in chunk[:end].decode(errors="replace").splitlines():
                # a progress bar may share the line (stderr and stdout go to the same file)
                for marker in ("[compare] ", "eval at step"):
                    at = raw.find(marker)
                    if at >= 0:
                        lines.append("  " + raw[at:].removeprefix("[compare] ").strip())
                        break
        if extra:
            line = extra()
            if line:
                lines.append(line)
        return "\n".join(lines) or None

    return progress
