"""`opd bench weight-push`: how long a live weight update of the default student takes over loopback.

One real `opd serve-teacher --weight-updates` serving the student (default: the default student, 99M
parameters, fp32). The payload is what `opd train --teacher-follows-student` sends: the student's
state_dict without the tied lm_head, serialized with safetensors. Per transport (HTTP PUT, gRPC
UpdateWeights), `repeats` pushes one after another, each timed on the client (send, spool, check, swap,
answer) beside the service's own split: `load_s` (reading and checking the spooled file; forwards go on)
and `swap_s` (the forward thread copying the tensors in: how long scoring pauses). Results in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save
from transformers import AutoModelForCausalLM

from opd_client import GrpcTeacherClient, HttpTeacherClient
from opd_client.retry import RetryPolicy
from opd_common.dataclass_flags import add_dataclass_flags, dataclass_from_args
from opd_common.launch import start_teacher
from opd_student.tools.make_student import resolve_student


@dataclass(frozen=True)
class WeightPushConfig:
    student: str = "default"  # the model served and pushed: "default" (the default student) or an HF dir
    repeats: int = 3  # pushes per transport
    dtype: str = "float32"  # the service's --dtype (the payload is cast to it)
    device: str = "cpu"  # the service's --device


def run(cfg: WeightPushConfig) -> dict:
    path = resolve_student(cfg.student)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    dtype = getattr(torch, cfg.dtype)
    started = time.perf_counter()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {
        k: v.detach().to(dtype) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")
    }
    payload = save(state)
    serialize_s = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    del model, state
    with tempfile.TemporaryDirectory() as tmp:
        extra = ["--weight-updates", "--dtype", cfg.dtype, "--device", cfg.device]
        teacher = start_teacher(Path(tmp), [f"student={path}"], api_key="bench", extra_args=extra)
        try:
            once = RetryPolicy(max_attempts=1)
            with (
                HttpTeacherClient(teacher.http_url, api_key="bench", timeout=600, retry=once) as http,
                GrpcTeacherClient(teacher.grpc_target, api_key="bench", timeout=600, retry=once) as grpc,
            ):
                runs = {
                    name: _pushes(client, payload, cfg.repeats)
                    for name, client in (("http", http), ("grpc", grpc))
                }
        finally:
            teacher.stop()
    return {
        "config": asdict(cfg),
        "student": str(path),
        "params": params,
        "payload_bytes": len(payload),
        "serialize_s": serialize_s,
        "runs": runs,
        "summary": {name: _summary(pushes, len(payload)) for name, pushes in runs.items()},
    }


def _pushes(client, payload: bytes, repeats: int) -> list[dict]:
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        update = client.push_weights(payload, model="student")
        out.append(
            {
                "total_s": time.perf_counter() - started,
                "load_s": update.load_s,
                "swap_s": update.swap_s,
                "version": update.weights_version,
            }
        )
    return out


def _summary(pushes: list[dict], nbytes: int) -> dict:
    median = {key: statistics.median(p[key] for p in pushes) for key in ("total_s", "load_s", "swap_s")}
    return {
        **{f"median_{k}": v for k, v in median.items()},
        "min_total_s": min(p["total_s"] for p in pushes),
        "max_total_s": max(p["total_s"] for p in pushes),
        "mb_per_s": nbytes / 1e6 / median["total_s"],
    }


def print_report(result: dict) -> None:
    mb = result["payload_bytes"] / 1e6
    print(
        f"push of {result['student']} ({result['params'] / 1e6:.1f}M params, {mb:.1f} MB of safetensors; "
        f"serialized in {result['serialize_s']:.2f} s)"
    )
    print("| transport | total s (median, min-max) | MB/s | load + check s | swap s (scoring paused) |")
    print("|---|---|---:|---:|---:|")
    for name, s in result["summary"].items():
        print(
            f"| {name} | {s['median_total_s']:.2f} ({s['min_total_s']:.2f}-{s['max_total_s']:.2f}) | "
            f"{s['mb_per_s']:.0f} | {s['median_load_s']:.2f} | {s['median_swap_s']:.3f} |"
        )


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "weight-push",
        help="time to push the default student's weights to a live teacher (docs/benchmarks.md)",
    )
    add_dataclass_flags(p, WeightPushConfig, defaults_from_cls=True)
    p.add_argument("--json-out", type=Path, help="also write the full result as JSON here")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    result = run(dataclass_from_args(WeightPushConfig, args))
    print_report(result)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0
