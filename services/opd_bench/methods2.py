"""`opd bench methods2`: the Methods II measurements of docs/benchmarks.md, one `opd train` after another
against one shared teacher service, on the demo's settings (the recipes under recipes/, loss reverse_kl):

- staleness: max_staleness 1, 2 and 4, without and with the off-policy correction (truncated IS);
- methods: plain OPD against each method of docs/methods.md ("Methods II"), same steps, seeds 0 and 1;
- forms: student_topk_reverse_kl as tail / truncated / truncated_sg (the study's stop-gradient variant).

Each finished run appends one line to OUT/results.jsonl (a rerun skips the runs already there, so the bench
resumes where it stopped) and OUT/table.md is rewritten: the held-out KL before and after (sampled reverse
KL and the exact reverse KL over the vocabulary), the whole command's wall time, the train steps' time,
and the teacher tokens (completion positions the teacher scored or generated, with the methods' extra
positions, the cold start's and the prompt selection's).

    .venv/bin/opd bench methods2 --out runs/methods2                 # everything, ~3 h on a 2-core CPU
    .venv/bin/opd bench methods2 --out runs/methods2 --only opd,trd  # some runs
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@dataclass(frozen=True)
class Arm:
    name: str  # the table's row
    recipe: str  # recipes/NAME.toml
    flags: tuple[str, ...] = ()
    group: str = "methods"


def arms(seeds: list[int]) -> list[tuple[Arm, int]]:
    """Every run in the order they are made: the staleness table first, then the methods, seed by seed."""
    staleness = [
        Arm(
            f"staleness {s}{' + IS' if corrected else ''}",
            "off-policy-is" if corrected else "opd",
            ("--max-staleness", str(s)),
            "staleness",
        )  # fmt: skip
        for s in (1, 2, 4)
        for corrected in (False, True)
    ]
    methods = [
        Arm("plain OPD", "opd"),
        Arm("truncated IS", "off-policy-is"),
        Arm("PPO clip", "ppo-clip"),
        Arm("DRPO", "drpo"),
        Arm("GAE-OPD", "gae-opd"),
        Arm("near-future (TOPD)", "near-future"),
        Arm("LGR", "lgr"),
        Arm("CR-OPD", "cr-opd"),
        Arm("TRB", "trb"),
        Arm("TRD", "trd"),
        Arm("cold start", "cold-start"),
        Arm("prompt selection", "prompt-select"),
    ]
    forms = [
        Arm("student top-k, tail", "topk-sg", ("--student-topk-form", "tail"), "forms"),
        Arm("student top-k, truncated", "topk-sg", ("--student-topk-form", "truncated"), "forms"),
        Arm("student top-k, truncated_sg", "topk-sg", (), "forms"),
    ]
    out = [(a, seeds[0]) for a in staleness]
    out += [(a, s) for s in seeds for a in methods]
    out += [(a, s) for s in seeds for a in forms]
    return out


def key(arm: Arm, seed: int) -> str:
    return f"{arm.group}|{arm.name}|{seed}"


def run_dir_of(arm: Arm, seed: int, out: Path) -> Path:
    return (
        out / "runs" / f"{arm.group}-{arm.recipe}-{'-'.join(arm.flags).strip('-')}-s{seed}".replace("--", "")
    )


def run_one(arm: Arm, seed: int, url: str, out: Path, steps: int | None) -> dict:
    run_dir = run_dir_of(arm, seed, out)
    if run_dir.exists():  # an interrupted run: start it again
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    command = [sys.executable, "-m", "opd_cli.main", "train", "--config", str(RECIPES / f"{arm.recipe}.toml")]
    command += [
        *arm.flags,
        "--seed",
        str(seed),
        "--teacher-url",
        url,
        "--out",
        str(run_dir),
        "--save-every",
        "0",
    ]
    if steps is not None:
        command += ["--steps", str(steps)]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with open(out / "runs" / f"{run_dir.name}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    wall_s = time.perf_counter() - started
    return summarise(arm, seed, run_dir, wall_s, load_before, os.getloadavg()[0], command)


def summarise(
    arm: Arm, seed: int, run_dir: Path, wall_s: float, load_before: float, load_after: float, command
) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    evals = [r for r in records if r.get("eval")]
    steps = [r for r in records if not r.get("eval")]
    # the step's scored completion tokens, and what the methods asked beside them (LGR's candidates, TRB's
    # prefixes, TRD's rescoring and generation)
    extra = ("teacher/lookahead_positions", "teacher/sampling_positions")
    teacher_tokens = sum(r.get("tokens", 0) + sum(r.get(k, 0) for k in extra) for r in steps)
    for side_file in ("cold_start.json", "prompt_selection.json"):
        if (run_dir / side_file).exists():
            teacher_tokens += json.loads((run_dir / side_file).read_text())["teacher_tokens"]
    first, last = evals[0], evals[-1]
    return {
        "key": key(arm, seed),
        "group": arm.group,
        "arm": arm.name,
        "seed": seed,
        "kl_before": first["eval/reverse_kl"],
        "kl_after": last["eval/reverse_kl"],
        "exact_before": first.get("eval/exact_reverse_kl"),
        "exact_after": last.get("eval/exact_reverse_kl"),
        "wall_s": wall_s,
        "train_s": sum(v for r in steps for k, v in r.items() if k.startswith("time/")),
        "teacher_tokens": teacher_tokens,
        "load": [load_before, load_after],
        "command": " ".join(str(c) for c in command[2:]),
    }


def resummarise(results: list[dict], out: Path, seeds: list[int]) -> list[dict]:
    """Every result recomputed from its run directory (the bench's own fields kept: wall time, load, command)."""
    by_key = {key(a, s): (a, s) for a, s in arms(seeds)}
    fresh = []
    for r in results:
        arm, seed = by_key[r["key"]]
        load_before, load_after = r["load"]
        again = summarise(arm, seed, run_dir_of(arm, seed, out), r["wall_s"], load_before, load_after, [])
        fresh.append({**again, "command": r["command"]})
    return fresh


def means(results: list[dict]) -> str:
    """Per run name: the mean over its seeds of the KL after, wall and teacher tokens, and each seed's value."""
    lines = [
        "| run | seeds | sampled reverse KL after: mean (each seed) | exact reverse KL after: mean (each seed) "
        "| wall s (mean) | teacher tokens (mean) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    names = list(dict.fromkeys(r["arm"] for r in results if r["group"] != "staleness"))
    for name in names:
        rows = [r for r in results if r["arm"] == name and r["group"] != "staleness"]
        kl = [r["kl_after"] for r in rows]
        exact = [r["exact_after"] for r in rows if r["exact_after"] is not None]
        each = ", ".join(f"{x:.3f}" for x in kl)
        exact_text = (
            f"{sum(exact) / len(exact):.3f} ({', '.join(f'{x:.3f}' for x in exact)})" if exact else "–"
        )
        wall = sum(r["wall_s"] for r in rows) / len(rows)
        tokens = sum(r["teacher_tokens"] for r in rows) / len(rows)
        lines.append(
            f"| {name} | {len(rows)} | {sum(kl) / len(kl):.3f} ({each}) | {exact_text} | {wall:.0f} | {tokens:.0f} |"
        )
    return "\n".join(lines) + "\n"


def table(results: list[dict]) -> str:
    lines = []
    for group, title in (
        ("staleness", "Staleness"),
        ("methods", "Methods"),
        ("forms", "Student top-k forms"),
    ):
        rows = [r for r in results if r["group"] == group]
        if not rows:
            continue
        lines += [
            f"### {title}",
            "",
            "| run | seed | sampled reverse KL before → after | exact reverse KL before → after | wall s | train s | teacher tokens |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            exact = (
                f"{r['exact_before']:.3f} → {r['exact_after']:.3f}" if r["exact_before"] is not None else "–"
            )
            lines.append(
                f"| {r['arm']} | {r['seed']} | {r['kl_before']:.3f} → {r['kl_after']:.3f} | {exact} | "
                f"{r['wall_s']:.0f} | {r['train_s']:.0f} | {r['teacher_tokens']} |"
            )
        lines.append("")
    if any(r["group"] != "staleness" for r in results):
        lines += ["### Means over seeds", "", means(results)]
    return "\n".join(lines) + "\n"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "methods2", help="Methods II on the demo setup: staleness, methods, top-k forms"
    )
    p.add_argument("--out", type=Path, default=Path("runs/methods2"))
    p.add_argument(
        "--seeds", default="0,1", help="comma-separated seeds of the methods (default: %(default)s)"
    )
    p.add_argument("--only", default="", help="comma-separated recipe names to run (default: all)")
    p.add_argument("--steps", type=int, default=None, help="override the recipes' 24 steps (a quick check)")
    p.add_argument(
        "--resummarise",
        action="store_true",
        help="recompute results.jsonl and table.md from the run directories",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    from opd_common.launch import start_teacher

    out: Path = args.out
    (out / "runs").mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = (
        {json.loads(line)["key"]: json.loads(line) for line in results_path.read_text().splitlines()}
        if results_path.exists()
        else {}
    )
    if args.resummarise:
        fresh = resummarise(list(done.values()), out, [int(s) for s in args.seeds.split(",")])
        results_path.write_text("".join(json.dumps(r) + "\n" for r in fresh))
        (out / "table.md").write_text(table(fresh))
        return
    only = {n for n in args.only.split(",") if n}
    todo = [(a, s) for a, s in arms([int(s) for s in args.seeds.split(",")]) if not only or a.recipe in only]
    todo = [(a, s) for a, s in todo if key(a, s) not in done]
    print(f"[methods2] {len(todo)} runs to make, {len(done)} already in {results_path}", flush=True)
    if not todo:
        (out / "table.md").write_text(table(list(done.values())))
        return
    api_key = secrets.token_urlsafe(16)
    teacher = start_teacher(out, None, api_key=api_key)
    os.environ["OPD_TEACHER_API_KEY"] = api_key
    try:
        for arm, seed in todo:
            print(f"[methods2] {arm.group}: {arm.name}, seed {seed}", flush=True)
            result = run_one(arm, seed, teacher.http_url, out, args.steps)
            done[result["key"]] = result
            with results_path.open("a") as f:
                f.write(json.dumps(result) + "\n")
            (out / "table.md").write_text(table(list(done.values())))
            print(
                f"[methods2]   KL {result['kl_before']:.3f} -> {result['kl_after']:.3f}, {result['wall_s']:.0f} s",
                flush=True,
            )
    finally:
        teacher.stop()
