"""`opd bench limits`: this machine's memory bandwidth and matmul throughput, and the ceilings they set.

Measured with torch on the chosen device, each figure the best of a few repeats (the least disturbed one):
- bandwidth: a large tensor copy (read + write) and sum (read only), in GB/s (1e9 bytes); and the read
  bandwidth over a buffer as large as the student's weights, which is what one decode step reads (a working
  set that fits a large L3 is read faster than DRAM, so it is measured at that size, not assumed);
- matmul: `F.linear(x_M_K, W_N_K)` in fp32 and bf16 at the shapes the default models run (D → I, I → D and
  the D → V head) for a few row counts M: decode batches (1, 8) and scoring blocks (hundreds of rows).

Derived ceilings (arithmetic on those figures, nothing else):
- decoding the student: every weight is read once per step (the tied embedding whole, by the head), so
  steps/s ≤ bandwidth / weight bytes; tokens/s at batch B ≤ min(B · steps/s, matmul FLOP/s at B rows /
  (2 · matmul params)). KV-cache reads come on top and are not counted.
- scoring with the teacher: FLOPs per token ≈ 2 · matmul params + 2 · layers · context · d_attn (the
  attention term of Kaplan et al. 2020, eq. 2.2), so tokens/s ≤ best matmul FLOP/s / FLOPs per token; with
  hidden-state output the head (2 · V · D) is skipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from opd_bench.device_info import describe_device, load_average, synchronize
from opd_common.embedded import DEFAULT_TEACHER, resolve_model
from opd_student.tools.make_student import DEFAULT_LAYERS
from opd_teacher.backends.hf import pick_device

MIB = 1 << 20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LimitsConfig:
    model: str = DEFAULT_TEACHER  # the teacher; the student is its first student_layers layers' shape
    student_layers: int = DEFAULT_LAYERS
    device: str = "auto"
    bandwidth_mib: int = 1024  # per buffer; twice this machine's 480 MiB L3, so DRAM is what is measured
    rows: tuple[int, ...] = (1, 8, 64, 512)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    repeats: int = 5
    min_seconds: float = 0.02  # each timing repeats the call until it lasts this long (timer resolution)
    decode_batch: int = 8
    context: int = 256  # tokens of context per scored sequence, for the attention term (bench serve's)


# ---- timing -------------------------------------------------------------------------------------------


def best_seconds(fn: Callable[[], object], device: torch.device, repeats: int, min_seconds: float) -> float:
    """Seconds of one call: the best of `repeats` timings, each of enough calls to last min_seconds."""
    fn()  # warm-up: first-call allocation and kernel selection are not the steady state
    calls = 1
    while True:
        seconds = _timed(fn, calls, device)
        if seconds >= min_seconds or calls >= 1 << 16:
            break
        calls *= 2
    best = seconds / calls
    for _ in range(repeats - 1):
        best = min(best, _timed(fn, calls, device) / calls)
    return best


def _timed(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return time.perf_counter() - started


# ---- measurements -------------------------------------------------------------------------------------


def read_bandwidth(device: torch.device, nbytes: int, repeats: int, min_seconds: float) -> float:
    """GB/s of summing a float32 buffer of nbytes (a read of every byte, one scalar written)."""
    src = torch.rand(max(1, nbytes // 4), device=device)  # written once, so every page is mapped
    seconds = best_seconds(src.sum, device, repeats, min_seconds)
    return src.numel() * 4 / seconds / 1e9


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int, min_seconds: float) -> float:
    """GB/s of copying a float32 buffer of nbytes into another, counting read and write (STREAM copy)."""
    src = torch.rand(max(1, nbytes // 4), device=device)
    dst = torch.zeros_like(src)
    seconds = best_seconds(lambda: dst.copy_(src), device, repeats, min_seconds)
    return 2 * src.numel() * 4 / seconds / 1e9


@torch.inference_mode()
def matmul_throughput(
    device: torch.device, dtype: str, shapes: dict[str, tuple[int, int]], cfg: LimitsConfig
) -> list[dict]:
    """GFLOP/s of x_M_K @ W_N_K.T (2·M·K·N FLOPs) for every shape (K, N) and row count M."""
    rows = []
    for name, (k, n) in shapes.items():
        weight_N_K = torch.randn(n, k, device=device, dtype=DTYPES[dtype])
        for m in sorted(set(cfg.rows) | {cfg.decode_batch}):
            x_M_K = torch.randn(m, k, device=device, dtype=DTYPES[dtype])
            seconds = best_seconds(partial(F.linear, x_M_K, weight_N_K), device, cfg.repeats, cfg.min_seconds)
            gflop_s = 2 * m * k * n / seconds / 1e9
            rows.append({"dtype": dtype, "shape": name, "rows": m, "in": k, "out": n, "gflop_s": gflop_s})
    return rows


def best_gflop_s(matmul: list[dict], dtype: str, rows: int) -> float:
    """The fastest shape at this row count: a ceiling takes the best the machine showed."""
    return max(r["gflop_s"] for r in matmul if r["dtype"] == dtype and r["rows"] == rows)


# ---- model sizes --------------------------------------------------------------------------------------


def model_shapes(config: PretrainedConfig) -> dict[str, tuple[int, int]]:
    """(K, N) of the matmuls that dominate the model: the MLP's two projections and the output head."""
    d, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    return {"mlp_up D→I": (d, inter), "mlp_down I→D": (inter, d), "head D→V": (d, vocab)}


def student_config(teacher: PretrainedConfig, layers: int) -> PretrainedConfig:
    """The default student's shape: the teacher with `layers` decoder layers (which ones does not matter
    for sizes)."""
    config = copy.deepcopy(teacher)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    return config


def model_size(config: PretrainedConfig) -> dict:
    """Parameter counts of the model a config describes, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # a tied table is one parameter, counted once
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = embedding is head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "layers": config.num_hidden_layers,
        "params": params,
        # the embedding lookup is no matmul; a tied table is the head's weight and is read whole each step
        "matmul_params": params if tied else params - embedding.numel(),
        "head_params": head.numel(),
        "tied_embedding": tied,
        "d_attn": config.num_attention_heads * head_dim,
        "kv_values_per_context_token": 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim,
    }


# ---- ceilings -----------------------------------------------------------------------------------------


def decode_ceiling(student: dict, dtype: str, read_gb_s: float, matmul: list[dict], batch: int) -> dict:
    """Decode steps/s and tokens/s at `batch` that the bandwidth and the matmul throughput allow."""
    bytes_per_step = student["matmul_params"] * DTYPES[dtype].itemsize
    steps_per_s = read_gb_s * 1e9 / bytes_per_step
    compute_tokens_per_s = best_gflop_s(matmul, dtype, batch) * 1e9 / (2 * student["matmul_params"])
    return {
        "weights_dtype": dtype,
        "bytes_per_step": bytes_per_step,
        "read_gb_s": read_gb_s,
        "max_steps_per_s": steps_per_s,
        "batch": batch,
        "bandwidth_tokens_per_s": batch * steps_per_s,
        "compute_tokens_per_s": compute_tokens_per_s,
        "max_tokens_per_s": min(batch * steps_per_s, compute_tokens_per_s),
    }


def scoring_ceiling(teacher: dict, dtype: str, matmul: list[dict], rows: int, context: int) -> dict:
    """Scored tokens/s that the best measured matmul throughput allows, with and without the head."""
    attention = 2 * teacher["layers"] * context * teacher["d_attn"]
    flops = 2 * teacher["matmul_params"] + attention
    flops_hidden = flops - 2 * teacher["head_params"]
    gflop_s = best_gflop_s(matmul, dtype, rows)
    return {
        "dtype": dtype,
        "context": context,
        "rows": rows,
        "gflop_s": gflop_s,
        "flops_per_token": flops,
        "max_tokens_per_s": gflop_s * 1e9 / flops,
        "flops_per_token_hidden": flops_hidden,
        "max_tokens_per_s_hidden": gflop_s * 1e9 / flops_hidden,
    }


# ---- the whole probe ----------------------------------------------------------------------------------


def run_limits(cfg: LimitsConfig) -> dict:
    device = pick_device(cfg.device)
    started, load_before = time.perf_counter(), load_average()
    teacher_config = AutoConfig.from_pretrained(resolve_model(cfg.model)[0])
    teacher = model_size(teacher_config)
    student = model_size(student_config(teacher_config, cfg.student_layers))
    big = cfg.bandwidth_mib * MIB
    bandwidth: dict[str, object] = {
        "buffer_bytes": big,
        "copy_gb_s": copy_bandwidth(device, big, cfg.repeats, cfg.min_seconds),
        "read_gb_s": read_bandwidth(device, big, cfg.repeats, cfg.min_seconds),
    }
    _progress("bandwidth", bandwidth)
    matmul: list[dict] = []
    for dtype in cfg.dtypes:
        matmul += matmul_throughput(device, dtype, model_shapes(teacher_config), cfg)
        _progress(
            f"matmul {dtype}, best GFLOP/s", {f"M={m}": best_gflop_s(matmul, dtype, m) for m in cfg.rows}
        )
    decode, working_set = {}, {}  # per dtype
    for dtype in cfg.dtypes:
        nbytes = student["matmul_params"] * DTYPES[dtype].itemsize
        working_set[dtype] = read_bandwidth(device, nbytes, cfg.repeats, cfg.min_seconds)
        decode[dtype] = decode_ceiling(student, dtype, working_set[dtype], matmul, cfg.decode_batch)
    bandwidth["read_gb_s_at_student_weights"] = working_set
    scoring = {
        dtype: scoring_ceiling(teacher, dtype, matmul, max(cfg.rows), cfg.context) for dtype in cfg.dtypes
    }
    return {
        "config": asdict(cfg),
        "device": describe_device(device) | {"load_average_before": load_before},
        "seconds": time.perf_counter() - started,
        "bandwidth": bandwidth,
        "matmul": matmul,
        "teacher": teacher,
        "student": student,
        "decode_ceiling": decode,
        "scoring_ceiling": scoring,
    }


def _progress(what: str, figures: dict) -> None:
    print(
        f"{what}: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items() if isinstance(v, float)),
        flush=True,
    )


def format_report(result: dict) -> str:
    bw, dev = result["bandwidth"], result["device"]
    row_counts = sorted({r["rows"] for r in result["matmul"]})
    lines = [
        f"device: {dev['name']} ({dev['device']}, {dev['torch_threads']} threads); load average "
        f"{dev['load_average_before']} → {dev['load_average']}",
        f"bandwidth ({bw['buffer_bytes'] / MIB:.0f} MiB buffers): copy {bw['copy_gb_s']:.1f} GB/s, "
        f"read {bw['read_gb_s']:.1f} GB/s",
        "",
        "| dtype | shape | " + " | ".join(f"M={m}" for m in row_counts) + " |",
        "|---|---|" + "---:|" * len(row_counts),
    ]
    for dtype in result["config"]["dtypes"]:
        for shape in dict.fromkeys(r["shape"] for r in result["matmul"]):
            cells = [r for r in result["matmul"] if r["dtype"] == dtype and r["shape"] == shape]
            lines.append(f"| {dtype} | {shape} | " + " | ".join(f"{r['gflop_s']:.0f}" for r in cells) + " |")
    lines.append("(GFLOP/s)\n")
    s, t = result["student"], result["teacher"]
    lines.append(f"student: {s['layers']} layers, {s['params'] / 1e6:.1f}M params")
    for dtype, c in result["decode_ceiling"].items():
        lines.append(
            f"  decode, {dtype} weights: {c['bytes_per_step'] / 1e6:.0f} MB a step at {c['read_gb_s']:.1f} GB/s → "
            f"≤ {c['max_steps_per_s']:.1f} steps/s; batch {c['batch']}: ≤ {c['max_tokens_per_s']:.0f} tokens/s "
            f"(bandwidth {c['bandwidth_tokens_per_s']:.0f}, matmul {c['compute_tokens_per_s']:.0f})"
        )
    lines.append(f"teacher: {t['layers']} layers, {t['params'] / 1e6:.1f}M params")
    for dtype, c in result["scoring_ceiling"].items():
        lines.append(
            f"  scoring, {dtype}: {c['flops_per_token'] / 1e6:.0f} MFLOP a token (context {c['context']}) at "
            f"{c['gflop_s']:.0f} GFLOP/s → ≤ {c['max_tokens_per_s']:.0f} tokens/s top-k, "
            f"≤ {c['max_tokens_per_s_hidden']:.0f} hidden-state"
        )
    return "\n".join(lines)


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "limits",
        help="memory bandwidth, matmul throughput and the decode/scoring ceilings (docs/benchmarks.md)",
    )
    d = LimitsConfig()
    p.add_argument("--model", default=d.model, help="the teacher (embedded name or HF directory)")
    p.add_argument(
        "--student-layers", type=int, default=d.student_layers, help="the student's decoder layers"
    )
    p.add_argument("--device", default=d.device, help="auto: CUDA, then MPS, then CPU")
    p.add_argument("--bandwidth-mib", type=int, default=d.bandwidth_mib, help="MiB per bandwidth buffer")
    p.add_argument("--rows", default=",".join(map(str, d.rows)), help="matmul row counts M")
    p.add_argument("--dtypes", default=",".join(d.dtypes))
    p.add_argument("--repeats", type=int, default=d.repeats, help="timings per figure; the best is kept")
    p.add_argument("--min-seconds", type=float, default=d.min_seconds, help="shortest single timing")
    p.add_argument("--decode-batch", type=int, default=d.decode_batch, help="rollouts decoded together")
    p.add_argument("--context", type=int, default=d.context, help="tokens per scored sequence")
    p.add_argument("--json-out", type=Path, help="also write the full result as JSON here")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cfg = LimitsConfig(
        model=args.model,
        student_layers=args.student_layers,
        device=args.device,
        bandwidth_mib=args.bandwidth_mib,
        rows=tuple(int(m) for m in args.rows.split(",")),
        dtypes=tuple(t.strip() for t in args.dtypes.split(",")),
        repeats=args.repeats,
        min_seconds=args.min_seconds,
        decode_batch=args.decode_batch,
        context=args.context,
    )
    result = run_limits(cfg)
    print(format_report(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0
