"""From the arms' directories to results.json, table.md and the two plots.

Each arm's curve: held-out sampled reverse KL at its evaluation points, against the wall time it had spent
on training (steps without evaluation; SFT adds its teacher-sampling time up front) and against the teacher
tokens it had used (completion tokens scored, or for SFT generated and trained on, up to that step).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from opd_bench.compare.records import ARM, EVALS, STEPS, read_jsonl
from opd_bench.compare.settings import BY_NAME

RESULTS = "results.json"
TABLE = "table.md"
PLOT_TIME = "kl_vs_time.png"
PLOT_TOKENS = "kl_vs_teacher_tokens.png"
PACKAGES = ("torch", "transformers", "trl", "accelerate", "datasets", "opd")


def arm_summary(arm_dir: Path) -> dict[str, Any]:
    """One arm's numbers from its steps.jsonl, evals.jsonl and arm.json."""
    name = arm_dir.name
    steps = read_jsonl(arm_dir / STEPS)
    evals = {r["step"]: r for r in read_jsonl(arm_dir / EVALS)}  # by step: a re-evaluation replaces
    meta = json.loads((arm_dir / ARM).read_text()) if (arm_dir / ARM).exists() else {}
    data_time = float(meta.get("data_time_s", 0.0))
    train_time = sum(r["time_s"] for r in steps)
    elapsed, tokens, at_step = data_time, 0, {0: (0.0, 0)}
    for r in steps:
        elapsed += r["time_s"]
        tokens += r["teacher_tokens"]
        at_step[r["step"]] = (elapsed, tokens)
    curve = []
    for step in sorted(evals):
        if step not in at_step:
            raise ValueError(f"{arm_dir}: an evaluation at step {step}, which has no step record")
        time_s, used = at_step[step]
        curve.append(
            {
                "step": step,
                "time_s": time_s,
                "teacher_tokens": used,
                "reverse_kl": evals[step]["eval/reverse_kl"],
                "topk_forward_kl": evals[step]["eval/topk_forward_kl"],
                "eval_tokens": evals[step]["eval/tokens"],
                "exact_reverse_kl": evals[step].get("eval/exact_reverse_kl", math.nan),
            }
        )
    arm = BY_NAME[name]
    n = len(steps)
    return {
        "arm": name,
        "tool": arm.tool,
        "loss": arm.loss,
        "steps": n,
        "train_time_s": train_time,
        "data_time_s": data_time,
        "total_time_s": train_time + data_time,
        "time_per_step_s": train_time / n if n else math.nan,
        "step_times_s": [r["time_s"] for r in steps],
        "teacher_tokens": tokens,
        "peak_rss_mib": meta.get("peak_rss_bytes", 0) / 2**20,
        "process_wall_s": meta.get("process_wall_s"),
        "evals": curve,
        "kl_start": curve[0]["reverse_kl"] if curve else math.nan,
        "kl_end": curve[-1]["reverse_kl"] if curve else math.nan,
        "topk_forward_kl_end": curve[-1]["topk_forward_kl"] if curve else math.nan,
        "exact_kl_start": curve[0]["exact_reverse_kl"] if curve else math.nan,
        "exact_kl_end": curve[-1]["exact_reverse_kl"] if curve else math.nan,
    }


def ranking(arms: list[dict[str, Any]]) -> list[str]:
    """Arm names by final held-out sampled reverse KL, lowest (closest to the teacher) first."""
    return [a["arm"] for a in sorted(arms, key=lambda a: a["kl_end"])]


def table_markdown(arms: list[dict[str, Any]]) -> str:
    ranks = {name: i + 1 for i, name in enumerate(ranking(arms))}
    header = (
        "| rank | arm | tool | loss | steps | s/step | total s | teacher tokens | peak RSS MiB "
        "| KL step 0 | KL end | exact KL step 0 | exact KL end | top-20 fwd KL end |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for a in arms:
        lines.append(
            f"| {ranks[a['arm']]} | {a['arm']} | {a['tool']} | {a['loss']} | {a['steps']} "
            f"| {a['time_per_step_s']:.2f} | {a['total_time_s']:.0f} | {a['teacher_tokens']} "
            f"| {a['peak_rss_mib']:.0f} | {a['kl_start']:.3f} | {a['kl_end']:.3f} "
            f"| {a['exact_kl_start']:.3f} | {a['exact_kl_end']:.3f} | {a['topk_forward_kl_end']:.3f} |"
        )
    notes = [
        "",
        "KL: held-out sampled reverse KL(student ‖ teacher) in nats/token (opd's evaluate(); lower is closer "
        "to the teacher). exact KL: the same students' reverse KL over the full vocabulary (the teacher's "
        "hidden states and head; nan where the teacher serves none). s/step: training wall time per step without evaluation. total s: all steps, plus "
        "for SFT the time the teacher took to sample its data. teacher tokens: completion tokens the teacher "
        "scored (SFT: generated). peak RSS: the training process.",
    ]
    return "\n".join(lines + notes) + "\n"


def plot(arms: list[dict[str, Any]], x_key: str, x_label: str, path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100, layout="constrained")
    ax = fig.subplots()
    for a in arms:
        xs = [e[x_key] for e in a["evals"]]
        ys = [e["reverse_kl"] for e in a["evals"]]
        ax.plot(xs, ys, marker="o", label=f"{a['arm']} ({a['tool']})")
    ax.set_xlabel(x_label)
    ax.set_ylabel("held-out sampled reverse KL (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for package in PACKAGES:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    repo = Path(__file__).resolve().parent  # git finds the checkout from any folder inside it
    out["opd_commit"] = _git(repo, "rev-parse", "HEAD")
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    out["opd_tree_dirty"] = None if status is None else bool(status)
    out["python"] = platform.python_version()
    return out


def hardware() -> dict[str, Any]:
    out: dict[str, Any] = {
        "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                out["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                out["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    import torch

    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def _git(repo: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def write_outputs(out: Path, arm_names: list[str], meta: dict[str, Any]) -> dict[str, Any]:
    """results.json, table.md and the two PNGs in out; returns the results."""
    arms = [arm_summary(out / name) for name in arm_names]
    results = {**meta, "ranking": ranking(arms), "arms": arms}
    (out / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    (out / TABLE).write_text(table_markdown(arms))
    s = meta["settings"]
    size = (
        f"{s['steps']} steps x {s['prompts_per_step']} prompts x {s['samples_per_prompt']} samples x "
        f"<= {s['max_new_tokens']} tokens"
    )
    plot(
        arms,
        "time_s",
        "training wall time (s, evaluation excluded)",
        out / PLOT_TIME,
        f"KL vs wall time ({size})",
    )
    plot(arms, "teacher_tokens", "teacher tokens used", out / PLOT_TOKENS, f"KL vs teacher tokens ({size})")
    return results
