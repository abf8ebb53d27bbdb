"""`opd bench gpu`: the prepared accelerator check (scripts/gpu_check.sh runs it under a hard time limit).

On a CUDA machine with no network it builds random-weight models of real sizes from configs (gpu_models.py:
Qwen3-1.7B and Llama-3-8B shapes as teachers, Qwen3-0.6B as the student), and for each teacher measures
what `opd bench serve` measures, in bf16: the service's scored tokens/s (a real `opd serve-teacher` on the
saved model directory, 1/8/32 clients over HTTP and gRPC) against the raw forward in this process, with
the top-k and with the hidden-state output (serve.py's machinery, unchanged). Then one trainer step: `opd
train --steps 1` against the first teacher's service. Every figure and the device go to one JSON file.

Parts run in order under one time budget (check_parts.py); what the budget cannot fit is recorded as
skipped. On a CPU, `--sizes tiny` (the default there) runs the same parts on 2-layer, hidden-128 models of
the same architectures and vocabularies, which is how the test suite keeps this check from rotting; their
figures mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from opd_bench.check_parts import CheckRun
from opd_bench.device_info import describe_device, load_average
from opd_bench.gpu_models import SIZES, build_model_dir
from opd_bench.serve import ServeBenchConfig, make_pool, run_raw, run_service
from opd_common.launch import LocalTeacher, start_teacher
from opd_teacher.backends.hf import HFBackend, HFLimits, pick_device
from opd_teacher.batcher import BatchLimits

TRAIN_SETTINGS = [
    "--steps", "1", "--loss", "reverse_kl", "--prompts-per-step", "4", "--samples-per-prompt", "2",
    "--eval-num-prompts", "1", "--eval-max-new-tokens", "4", "--save-every", "0", "--seed", "0",
]  # fmt: skip

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class GpuCheckConfig:
    sizes: str = "auto"  # real (CUDA) or tiny (anything else); gpu_models.SIZES
    device: str = "auto"
    dtype: str = "bfloat16"
    clients: tuple[int, ...] = (1, 8, 32)
    transports: tuple[str, ...] = ("http", "grpc")
    signals: tuple[str, ...] = ("topk", "hidden")
    seq_len: int = 256
    prompt_len: int = 64
    top_k: int = 20
    requests_per_client: int = 4
    max_batch_tokens: int = 8192
    train_max_new_tokens: int = 48
    budget_s: float = 540.0  # 9 min: scripts/gpu_check.sh kills at 10, so a part that overruns still ends
    min_part_s: float = 20.0  # a part starts only with this much of the budget left

    def serve_config(self, model_dir: Path) -> ServeBenchConfig:
        return ServeBenchConfig(
            model=str(model_dir), clients=self.clients, transports=self.transports, seq_len=self.seq_len,
            prompt_len=self.prompt_len, top_k=self.top_k, signals=self.signals,
            requests_per_client=self.requests_per_client, max_batch_tokens=self.max_batch_tokens,
            dtype=self.dtype, device=self.device,
        )  # fmt: skip


def resolve_sizes(sizes: str, device: torch.device) -> str:
    if sizes == "auto":
        return "real" if device.type == "cuda" else "tiny"
    if sizes not in SIZES:
        raise ValueError(f"--sizes must be auto, {', '.join(SIZES)}; got {sizes!r}")
    return sizes


# ---- parts --------------------------------------------------------------------------------------------


def start_part(stack: ExitStack, holder: dict, model_dir: Path, cfg: GpuCheckConfig, run: CheckRun) -> dict:
    """A real `opd serve-teacher` on the saved directory; the time until it answers /health/ready."""
    flags = ["--dtype", cfg.dtype, "--device", cfg.device, "--max-batch-tokens", str(cfg.max_batch_tokens)]
    workdir = model_dir.with_name(model_dir.name + "-service")
    teacher = start_teacher(
        workdir, [str(model_dir)], api_key="bench-key", extra_args=flags, ready_timeout=run.remaining_s()
    )
    holder["teacher"] = stack.enter_context(teacher)
    return {"log": str(teacher.log_path)}


def serve_part(holder: dict, model_dir: Path, cfg: GpuCheckConfig, run: CheckRun) -> dict:
    """serve.py's raw-vs-service runs at every client count and signal, until the budget is spent."""
    teacher: LocalTeacher = holder["teacher"]
    serve_cfg = cfg.serve_config(model_dir)
    batch = BatchLimits(max_batch_tokens=cfg.max_batch_tokens)
    backend = HFBackend(
        "raw", str(model_dir), dtype=cfg.dtype, device=cfg.device, limits=HFLimits(), batch=batch
    )
    info = backend.info
    try:
        rows = _serve_rows(backend, teacher, serve_cfg, cfg, run)
    finally:  # the raw copy leaves the accelerator before the next part needs its memory
        del backend
        _free_memory()
    return {"device": info.device, "dtype": info.dtype, "vocab_size": info.vocab_size, "runs": rows}


def _serve_rows(
    backend, teacher: LocalTeacher, serve_cfg: ServeBenchConfig, cfg: GpuCheckConfig, run: CheckRun
) -> list[dict]:
    """Raw, then the service over each transport, on the same pool: every client count × signal."""
    vocab = backend.info.tokenizer_vocab_size or backend.info.vocab_size  # ids the tokenizer knows
    warm = make_pool(serve_cfg, 2, 999, vocab)
    for sig in cfg.signals:  # first-call costs (allocator, kernel choice) out of the timed runs
        run_raw(backend, warm, serve_cfg, sig)
        for transport in cfg.transports:
            run_service(teacher, transport, 2, warm, serve_cfg, sig)
    rows: list[dict] = []
    for n, clients in enumerate(cfg.clients):
        pool = make_pool(serve_cfg, max(serve_cfg.min_requests, clients * cfg.requests_per_client), n, vocab)
        for sig in cfg.signals:
            if run.remaining_s() <= 0:
                rows.append({"clients": clients, "signal": sig, "skipped": "time budget spent"})
                continue
            raw = run_raw(backend, pool, serve_cfg, sig)
            rows.append(raw.row(None) | {"clients": clients})
            for transport in cfg.transports:
                rows.append(run_service(teacher, transport, clients, pool, serve_cfg, sig).row(raw))
            print("  " + "; ".join(_row_text(r) for r in rows[-1 - len(cfg.transports) :]), flush=True)
    return rows


def train_part(holder: dict, student_dir: Path, cfg: GpuCheckConfig, run: CheckRun) -> dict:
    """One `opd train` step against the service: its phases' seconds from the run's metrics.jsonl."""
    teacher: LocalTeacher = holder["teacher"]
    out = student_dir.with_name("train-run")  # run_gpu_check removes it after this part
    cmd = [sys.executable, "-m", "opd_cli.main", "train", "--teacher-url", teacher.http_url,
           "--student", str(student_dir), "--out", str(out), "--device", cfg.device,
           "--max-new-tokens", str(cfg.train_max_new_tokens), *TRAIN_SETTINGS]  # fmt: skip
    env = {**os.environ, "OPD_TEACHER_API_KEY": teacher.api_key}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(1.0, run.remaining_s()))
    if r.returncode != 0:
        raise RuntimeError(f"opd train exited with {r.returncode}:\n{(r.stdout + r.stderr)[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [rec for rec in records if not rec.get("eval")]
    return {"student": str(student_dir.name), "step": steps[-1], "evals": len(records) - len(steps)}


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _row_text(row: dict) -> str:
    ratio = f" ({row['service_over_raw']:.2f} of raw)" if row.get("service_over_raw") else ""
    return (
        f"{row['clients']} {row['signal']} {row['transport']}: {row['scored_tokens_per_s']:.0f} tok/s{ratio}"
    )


# ---- the whole check ----------------------------------------------------------------------------------


def run_gpu_check(cfg: GpuCheckConfig, workdir: Path, out: Path) -> dict:
    device = pick_device(cfg.device)
    sizes = resolve_sizes(cfg.sizes, device)
    dtype = DTYPES[cfg.dtype]
    header = {"device": describe_device(device), "sizes": sizes, "config": asdict(cfg)}
    run = CheckRun(out, header, cfg.budget_s, cfg.min_part_s)
    teachers, student = SIZES[sizes]["teachers"], SIZES[sizes]["student"]
    for i, name in enumerate(teachers):
        model_dir = workdir / name
        run.run(f"build/{name}", partial(build_model_dir, name, model_dir, device, dtype))
        with ExitStack() as stack:
            holder: dict = {}
            run.run(
                f"start/{name}", partial(start_part, stack, holder, model_dir, cfg, run), (f"build/{name}",)
            )
            run.run(f"serve/{name}", partial(serve_part, holder, model_dir, cfg, run), (f"start/{name}",))
            if i == 0:  # the trainer step against the smallest teacher's service
                student_dir = workdir / f"student-{student}"
                run.run("build/student", partial(build_model_dir, student, student_dir, device, dtype))
                train = partial(train_part, holder, student_dir, cfg, run)
                run.run("train_step", train, (f"start/{name}", "build/student"))
                for done in (student_dir, workdir / "train-run"):  # disk for the next teacher
                    shutil.rmtree(done, ignore_errors=True)
        shutil.rmtree(model_dir, ignore_errors=True)  # an 8B model is 16 GB on disk
    run.data["summary"] = summarise(run.data["parts"])
    run.data["load_average_end"] = load_average()  # beside the header's: was the machine shared?
    run.write()
    return run.data


def summarise(parts: list[dict]) -> dict:
    """The figures a reader wants first: service/raw per run, and the trainer step's phases."""
    serve = [
        {"model": p["name"].removeprefix("serve/"), **r}
        for p in parts
        if p["name"].startswith("serve/") and p["status"] == "ok"
        for r in p["result"]["runs"]
        if r.get("transport") not in (None, "raw")
    ]
    step = next(
        (p["result"]["step"] for p in parts if p["name"] == "train_step" and p["status"] == "ok"), None
    )
    keys = ("time/sample_s", "time/score_wait_s", "time/train_s", "tokens", "tokens_per_s", "mem/peak_mib")
    return {
        "parts": {p["name"]: p["status"] for p in parts},
        "serve": [
            {
                k: r.get(k)
                for k in (
                    "model",
                    "clients",
                    "signal",
                    "transport",
                    "scored_tokens_per_s",
                    "service_over_raw",
                )
            }
            for r in serve
        ],  # fmt: skip
        "train_step": {k: step.get(k) for k in keys} if step else None,
    }


def format_summary(summary: dict) -> str:
    lines = [f"{name}: {status}" for name, status in summary["parts"].items()]
    lines += [
        "",
        "| model | clients | signal | transport | scored tokens/s | service / raw |",
        "|---|---:|---|---|---:|---:|",
    ]
    for r in summary["serve"]:
        lines.append(
            f"| {r['model']} | {r['clients']} | {r['signal']} | {r['transport']} | "
            f"{r['scored_tokens_per_s']:.0f} | {r['service_over_raw']:.3f} |"
        )
    if summary["train_step"]:
        lines.append("\ntrainer step: " + ", ".join(f"{k} {v}" for k, v in summary["train_step"].items()))
    return "\n".join(lines)


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "gpu",
        help="the prepared accelerator check: real-size random models, service vs raw, one trainer step",
    )
    d = GpuCheckConfig()
    p.add_argument("--sizes", default=d.sizes, help="auto (real on CUDA, else tiny), real, tiny")
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype, help="the teachers' dtype, raw and service alike")
    p.add_argument("--clients", default=",".join(map(str, d.clients)), help="comma-separated client counts")
    p.add_argument("--transports", default=",".join(d.transports))
    p.add_argument("--signals", default=",".join(d.signals), help="topk, hidden")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--prompt-len", type=int, default=d.prompt_len)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--requests-per-client", type=int, default=d.requests_per_client)
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens)
    p.add_argument("--train-max-new-tokens", type=int, default=d.train_max_new_tokens)
    p.add_argument("--budget-s", type=float, default=d.budget_s, help="parts that do not fit are skipped")
    p.add_argument("--min-part-s", type=float, default=d.min_part_s)
    p.add_argument("--workdir", type=Path, help="where models are saved (default: a temporary directory)")
    p.add_argument("--out", "--json-out", dest="out", type=Path, default=Path("gpu_check.json"))
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cfg = GpuCheckConfig(
        sizes=args.sizes, device=args.device, dtype=args.dtype,
        clients=tuple(int(c) for c in args.clients.split(",")),
        transports=tuple(t.strip() for t in args.transports.split(",")),
        signals=tuple(s.strip() for s in args.signals.split(",")),
        seq_len=args.seq_len, prompt_len=args.prompt_len, top_k=args.top_k,
        requests_per_client=args.requests_per_client, max_batch_tokens=args.max_batch_tokens,
        train_max_new_tokens=args.train_max_new_tokens, budget_s=args.budget_s, min_part_s=args.min_part_s,
    )  # fmt: skip
    # The wrapper's timeout sends SIGTERM: unwind, so the `with` blocks stop the service processes.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with ExitStack() as stack:
            workdir = args.workdir or Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="opd-gpu-"))
            )
            workdir.mkdir(parents=True, exist_ok=True)
            result = run_gpu_check(cfg, workdir, args.out)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_summary(result["summary"]))
    print(f"\nwritten: {args.out}")
    return 1 if any(p["status"] == "failed" for p in result["parts"]) else 0  # skipped: the budget's call


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)
