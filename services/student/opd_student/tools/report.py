"""`opd report RUN_DIR`: plots (report.png) and a short summary (summary.md) from a run's metrics.jsonl.

Train records carry "step" and keys such as "loss", "kl/sampled_reverse", "tokens_per_s", "time/step_s";
eval records carry "eval": true, "step" and keys such as "eval/reverse_kl", "eval/topk_forward_kl".
Every panel plots the keys it finds, so runs with other losses or fewer metrics still get a report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

from opd_student.metrics_log import read_metrics

REPORT_PNG = "report.png"
SUMMARY_MD = "summary.md"
CONFIG_FILES = ("config.json", "config.toml", "config.yaml", "config.yml")
# The eval metric the summary's headline and "best" use, when present.
PRIMARY_EVAL_KEYS = ("eval/reverse_kl", "eval/topk_forward_kl")


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="plots (report.png) and summary.md from a run's metrics.jsonl")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    try:
        png_path, md_path = write_report(args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"opd report: {e}") from None
    print(f"wrote {png_path}\nwrote {md_path}")
    for line in _headline(split_records(read_metrics(args.run_dir))[1]):
        print(line)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write run_dir/report.png and run_dir/summary.md; returns their paths."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no records yet")
    train, evals = split_records(records)
    png_path = run_dir / REPORT_PNG
    md_path = run_dir / SUMMARY_MD
    plot_report(train, evals, png_path, title=run_dir.resolve().name)
    md_path.write_text(summary_markdown(run_dir, train, evals), encoding="utf-8")
    return png_path, md_path


def split_records(records: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(train records, eval records), each sorted by step; records without a step are left out."""
    steps = [r for r in records if isinstance(r.get("step"), int)]
    train = sorted((r for r in steps if not r.get("eval")), key=lambda r: r["step"])
    evals = sorted((r for r in steps if r.get("eval")), key=lambda r: r["step"])
    return train, evals


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], float(r[key])) for r in records if _is_number(r.get(key))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _keys(records: list[dict], accept) -> list[str]:
    """Numeric keys present in the records that `accept` takes, in first-seen order."""
    seen: dict[str, None] = {}
    for r in records:
        for key, value in r.items():
            if key not in seen and _is_number(value) and accept(key):
                seen[key] = None
    return list(seen)


def _is_loss(key: str) -> bool:
    return key == "loss" or key.startswith("loss/")


def _is_train_kl(key: str) -> bool:
    return key.startswith("kl/") or key == "kl" or key.startswith("kl_")


def _is_time(key: str) -> bool:
    return key.startswith("time/") and key.endswith("_s")


def _is_eval_kl(key: str) -> bool:
    return key.startswith("eval/") and "kl" in key


# ---- plot ----------------------------------------------------------------------------------------


def plot_report(train: list[dict], evals: list[dict], png_path: Path, title: str = "") -> None:
    # Figure without pyplot: no global backend or state, renders with Agg whatever the environment.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8), dpi=100, layout="constrained")
    ax_loss, ax_kl, ax_eval, ax_speed = fig.subplots(2, 2).flat
    _plot_keys(ax_loss, train, _keys(train, _is_loss), "loss", "loss")
    _plot_keys(ax_kl, train, _keys(train, _is_train_kl), "KL to teacher (train batches)", "nats / token")
    _plot_keys(
        ax_eval, evals, _keys(evals, _is_eval_kl), "KL to teacher (held-out eval)", "nats / token", marker="o"
    )
    _plot_throughput(ax_speed, train)
    if title:
        fig.suptitle(title)
    fig.savefig(png_path, format="png")


def _plot_keys(ax, records: list[dict], keys: list[str], title: str, ylabel: str, marker=None) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    plotted = False
    for key in keys:
        steps, values = _series(records, key)
        if steps:
            ax.plot(steps, values, label=key, marker=marker)
            plotted = True
    if plotted:
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    else:
        _no_data(ax)


def _plot_throughput(ax, train: list[dict]) -> None:
    ax.set_title("throughput")
    ax.set_xlabel("step")
    tok_steps, tok_values = _series(train, "tokens_per_s")
    time_keys = _keys(train, _is_time)
    if tok_steps:
        ax.plot(tok_steps, tok_values, color="black", label="tokens_per_s")
        ax.set_ylabel("tokens / s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left")
    if time_keys:
        # Seconds per step (total or per phase) on their own axis: a different unit from tokens/s.
        ax_time = ax.twinx() if tok_steps else ax
        for key in time_keys:
            ax_time.plot(*_series(train, key), label=key, linestyle="--")
        ax_time.set_ylabel("s / step")
        ax_time.legend(fontsize="small", loc="upper right")
    if not tok_steps and not time_keys:
        _no_data(ax)


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")


# ---- summary -------------------------------------------------------------------------------------


def summary_markdown(run_dir: Path, train: list[dict], evals: list[dict]) -> str:
    lines = [f"# Run summary: {run_dir.resolve().name}", ""]
    lines += _headline(evals)
    lines += ["", "| | |", "|---|---|"]
    if train:
        lines.append(f"| steps | {len(train)} logged, steps {train[0]['step']}–{train[-1]['step']} |")
    else:
        lines.append("| steps | no train records |")
    lines += _wall_time_rows(train + evals, train)
    _, losses = _series(train, "loss")
    if losses:
        lines.append(f"| loss | first {losses[0]:.4g}, last {losses[-1]:.4g} |")
    _, tokens_per_s = _series(train, "tokens_per_s")
    if tokens_per_s:
        lines.append(f"| throughput | {sum(tokens_per_s) / len(tokens_per_s):.1f} tokens/s (mean) |")

    eval_keys = _keys(evals, _is_eval_kl)
    if eval_keys:
        lines += ["", "## Held-out eval", ""]
        last = evals[-1]
        if _is_number(last.get("eval/prompts")) and _is_number(last.get("eval/tokens")):
            lines += [f"{int(last['eval/prompts'])} prompts, {int(last['eval/tokens'])} scored tokens.", ""]
        lines += ["| metric | before | after | change | best (step) |"]
        lines.append("|---|---|---|---|---|")
        for key in eval_keys:
            steps, values = _series(evals, key)
            best = min(range(len(values)), key=values.__getitem__)
            lines.append(
                f"| {key} | {values[0]:.4f} (step {steps[0]}) | {values[-1]:.4f} (step {steps[-1]}) | "
                f"{_relative_change(values[0], values[-1])} | {values[best]:.4f} ({steps[best]}) |"
            )
    lines += ["", "Plots: report.png", ""]
    lines += _config_section(run_dir)
    return "\n".join(lines) + "\n"


def _headline(evals: list[dict]) -> list[str]:
    """'KL to teacher: before → after (−x %)' for the primary eval metric, when there are two evals."""
    for key in PRIMARY_EVAL_KEYS:
        steps, values = _series(evals, key)
        if len(values) >= 2:
            return [
                f"**KL to teacher ({key}): {values[0]:.4f} → {values[-1]:.4f} nats/token "
                f"({_relative_change(values[0], values[-1])}, step {steps[0]} → {steps[-1]})**"
            ]
    return []


def _relative_change(before: float, after: float) -> str:
    if before == 0:
        return "n/a"
    change = (after - before) / abs(before) * 100
    return f"{change:+.1f} %"


def _wall_time_rows(records: list[dict], train: list[dict]) -> list[str]:
    rows = []
    stamps = [r["timestamp"] for r in records if _is_number(r.get("timestamp"))]
    if len(stamps) >= 2:
        rows.append(f"| wall time | {_duration(max(stamps) - min(stamps))} (first to last record) |")
    # "time/step_s" when the trainer logs the whole step, else the sum of its timed phases.
    time_keys = ["time/step_s"] if _series(train, "time/step_s")[0] else _keys(train, _is_time)
    step_seconds = sum(sum(_series(train, key)[1]) for key in time_keys)
    if time_keys == ["time/step_s"]:
        rows.append(f"| time in train steps | {_duration(step_seconds)} |")
    elif time_keys:
        rows.append(f"| time in train steps | {_duration(step_seconds)} (sum of {', '.join(time_keys)}) |")
    if stamps:
        finished = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(max(stamps)))
        rows.append(f"| last record | {finished} |")
    return rows


def _duration(seconds: float) -> str:
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes)} min {secs:.0f} s" if minutes else f"{secs:.1f} s"


def _config_section(run_dir: Path) -> list[str]:
    for name in CONFIG_FILES:
        path = run_dir / name
        if path.is_file():
            text = path.read_text(encoding="utf-8").strip()
            lang = path.suffix.lstrip(".")
            if lang == "json":
                with contextlib.suppress(json.JSONDecodeError):  # else show the file as it is
                    text = json.dumps(json.loads(text), indent=2)
            return [f"## Config ({name})", "", f"```{lang}", text, "```", ""]
    return []
