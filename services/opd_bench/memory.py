"""Peak memory of scoring with chunked top-k (what the service does) versus materialising full logits.

Each variant runs in its own fresh subprocess, so one variant's peak cannot hide inside the other's (the
process high-water mark never goes down, and the allocator keeps some freed memory for reuse):

    python -m opd_bench.memory                     # every variant: table, agreement, JSON
    python -m opd_bench.memory --variant chunked   # one variant in this process: one JSON line

Variants, on the same random tokens (fixed seed), each row = prompt_len prompt tokens + a completion:
- chunked: HFBackend.score on ScoreItems, so the lm_head and log-softmax run on completion positions
  only, chunk_tokens rows at a time (backends/topk.py).
- full: the naive way, `model(input_ids).logits` for every position, log_softmax over all of it, then
  topk / gather on the completion positions.
- forward: the reference floor, only the transformer forward to hidden states as HFBackend runs it (no
  lm_head); what any way of scoring pays before the first logit.

On CPU, scoring memory is resident set size (RSS) above a baseline taken just before scoring (model
loaded, one short warm-up call done so every weight page is resident, token batch built). The peak is
read two ways:
- sampled: a thread reads VmRSS every 5 ms during scoring (can miss a spike shorter than that);
- hwm: the kernel's exact high-water mark VmHWM after scoring. It cannot be reset, so it says something
  about scoring only if scoring raised it above the mark left by loading; otherwise it is reported as None.
The reported peak is the larger of the two. On CUDA, device memory from torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from opd_common.embedded import DEFAULT_TEACHER
from opd_teacher.backends.base import ScoreItem
from opd_teacher.backends.hf import HFBackend, HFLimits
from opd_teacher.batcher import BatchLimits

VARIANTS = ("forward", "chunked", "full")
MIB = 1 << 20
SAMPLE_INTERVAL_S = 0.005


@dataclass(frozen=True)
class BenchConfig:
    model: str = DEFAULT_TEACHER
    batch: int = 4
    seq_len: int = 2048
    prompt_len: int = 64
    top_k: int = 20
    chunk_tokens: int = 512
    max_batch_tokens: int = 8192  # the service default: 4 × 2048 is one forward
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0

    def cli_flags(self) -> list[str]:
        return [f"--{name.replace('_', '-')}={value}" for name, value in asdict(self).items()]


def run_memory_bench(
    batch: int = 4,
    seq_len: int = 2048,
    prompt_len: int = 64,
    top_k: int = 20,
    chunk_tokens: int = 512,
    device: str = "auto",
    dtype: str = "float32",
    model: str = DEFAULT_TEACHER,
    max_batch_tokens: int = 8192,
    seed: int = 0,
    variants: tuple[str, ...] = VARIANTS,
) -> dict:
    """The variants (chunked and full at least), each in a fresh subprocess, one after the other."""
    cfg = BenchConfig(
        model, batch, seq_len, prompt_len, top_k, chunk_tokens, max_batch_tokens, device, dtype, seed
    )
    if not 1 <= prompt_len < seq_len:
        raise ValueError(f"--prompt-len must be in [1, seq_len={seq_len}); got {prompt_len}")
    if not {"chunked", "full"} <= set(variants) <= set(VARIANTS):
        raise ValueError(f"variants must include chunked and full, from {VARIANTS}; got {variants}")
    results, arrays = {}, {}
    with tempfile.TemporaryDirectory(prefix="opd-bench-memory-") as tmp:
        for variant in variants:
            arrays_path = Path(tmp) / f"{variant}.npz"
            results[variant] = _run_in_subprocess(cfg, variant, arrays_path)
            if arrays_path.exists():  # the forward variant scores nothing
                with np.load(arrays_path) as loaded:
                    arrays[variant] = dict(loaded)
    chunked = results["chunked"]
    theory = theoretical_sizes_mib(cfg, chunked["vocab_size"])
    if chunked["use_cache"]:  # transformers builds it from the model config unless told use_cache=False
        theory["kv_cache"] = chunked["kv_cache_mib"]
    return {
        "config": asdict(cfg),
        "theory_mib": theory,
        "variants": results,
        "agreement": agreement(arrays["chunked"], arrays["full"]),
    }


def theoretical_sizes_mib(cfg: BenchConfig, vocab: int) -> dict:
    """fp32 sizes the measured peaks should be read against (N × V × 4 bytes)."""
    n_all = cfg.batch * cfg.seq_len
    n_chunk = min(cfg.chunk_tokens, cfg.batch * (cfg.seq_len - cfg.prompt_len))
    return {
        "full_logits": n_all * vocab * 4 / MIB,  # [B, L, V]
        "full_logits_plus_log_softmax": 2 * n_all * vocab * 4 / MIB,
        "chunk_logits": n_chunk * vocab * 4 / MIB,  # [chunk_tokens, V]
        "chunk_logits_plus_log_softmax": 2 * n_chunk * vocab * 4 / MIB,
    }


def agreement(chunked: dict[str, np.ndarray], full: dict[str, np.ndarray]) -> dict:
    return {
        "top_logprobs_max_abs_diff": float(
            np.abs(chunked["top_logprobs_N_K"] - full["top_logprobs_N_K"]).max()
        ),
        "token_logprobs_max_abs_diff": float(
            np.abs(chunked["token_logprobs_N"] - full["token_logprobs_N"]).max()
        ),
        # Ids can swap where two logprobs tie to float precision; the values above would still agree.
        "top_ids_equal_fraction": float((chunked["top_ids_N_K"] == full["top_ids_N_K"]).mean()),
    }


def _run_in_subprocess(cfg: BenchConfig, variant: str, arrays_path: Path) -> dict:
    cmd = [sys.executable, "-m", __spec__.name, f"--variant={variant}", f"--arrays-out={arrays_path}"]
    done = subprocess.run(cmd + cfg.cli_flags(), capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{variant} variant failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])


# ---- one variant, in this process -----------------------------------------------------------------


def run_variant(cfg: BenchConfig, variant: str, arrays_out: Path | None = None) -> dict:
    """Load the model, warm up, score the batch under a MemoryProbe; the probe's figures and timings."""
    score = {"forward": forward_only, "chunked": score_chunked, "full": score_full}[variant]
    started = time.perf_counter()
    limits = HFLimits(
        max_top_k=max(cfg.top_k, HFLimits.max_top_k),
        logits_block_tokens=cfg.chunk_tokens,
    )
    backend = HFBackend(
        cfg.model,
        cfg.model,
        dtype=cfg.dtype,
        device=cfg.device,
        limits=limits,
        batch=BatchLimits(max_batch_tokens=cfg.max_batch_tokens),
    )
    load_s = time.perf_counter() - started
    tokens_B_L = random_tokens(cfg, backend.info.vocab_size)
    # Warm-up on a short row, scored (so the lm_head runs) and through this variant. transformers memory-maps
    # the safetensors weights and a forward alone leaves most of the tied embedding unread; after this every
    # weight page is resident and the thread pools are up, so each variant's baseline holds the same and its
    # peak is what its scoring adds.
    short_B_L = tokens_B_L[:1, : cfg.prompt_len + 8]
    score_chunked(backend, short_B_L, cfg.prompt_len, cfg.top_k)
    score(backend, short_B_L, cfg.prompt_len, cfg.top_k)

    with MemoryProbe(backend.device) as probe:
        started = time.perf_counter()
        out = score(backend, tokens_B_L, cfg.prompt_len, cfg.top_k)
        score_s = time.perf_counter() - started
    if arrays_out is not None and out:
        np.savez(arrays_out, **out)
    return {
        "variant": variant,
        "device": str(backend.device),
        "dtype": str(backend.dtype).removeprefix("torch."),
        "vocab_size": backend.info.vocab_size,
        "scored_positions": int(out["token_logprobs_N"].shape[0]) if out else 0,
        "torch_threads": torch.get_num_threads(),
        "use_cache": bool(getattr(backend.model.config, "use_cache", False)),
        "kv_cache_mib": kv_cache_mib(backend.model.config, cfg.batch, cfg.seq_len, backend.dtype),
        "load_s": round(load_s, 3),
        "score_s": round(score_s, 3),
        **probe.report(),
    }


def kv_cache_mib(config, batch: int, seq_len: int, dtype: torch.dtype) -> float:
    """Size of the key/value cache a forward builds when use_cache is on: layers x (K, V) x B x L x heads x dim."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    elements = config.num_hidden_layers * 2 * batch * seq_len * kv_heads * head_dim
    return elements * torch.finfo(dtype).bits / 8 / MIB


def random_tokens(cfg: BenchConfig, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(cfg.seed)
    return torch.randint(0, vocab, (cfg.batch, cfg.seq_len), generator=generator)


def score_chunked(backend: HFBackend, tokens_B_L: torch.Tensor, prompt_len: int, top_k: int) -> dict:
    """What the service does: every position after the prompt is a completion token to score."""
    items = [
        ScoreItem(context_ids=row[:prompt_len].tolist(), completion_ids=row[prompt_len:].tolist())
        for row in tokens_B_L
    ]
    scores = backend.score(items, top_k=top_k, temperature=1.0)
    return {
        "top_logprobs_N_K": np.concatenate([s.top_logprobs_T_K for s in scores]),
        "top_ids_N_K": np.concatenate([s.top_ids_T_K for s in scores]).astype(np.int64),
        "token_logprobs_N": np.concatenate([s.token_logprobs_T for s in scores]),
    }


@torch.inference_mode()
def forward_only(backend: HFBackend, tokens_B_L: torch.Tensor, prompt_len: int, top_k: int) -> dict:
    """The transformer forward alone, called as HFBackend._score_batch calls it (keep the two in step)."""
    input_ids_B_L = tokens_B_L.to(backend.device)
    attention_mask_B_L = torch.ones_like(input_ids_B_L)
    backend.model.base_model(input_ids=input_ids_B_L, attention_mask=attention_mask_B_L, use_cache=False)
    return {}


@torch.inference_mode()
def score_full(backend: HFBackend, tokens_B_L: torch.Tensor, prompt_len: int, top_k: int) -> dict:
    """The naive way: logits for all B × L positions, log-softmax over all of it, then pick positions."""
    input_ids_B_L = tokens_B_L.to(backend.device)
    logits_B_L_V = backend.model(input_ids=input_ids_B_L, use_cache=False).logits
    logprobs_B_L_V = torch.log_softmax(logits_B_L_V.float(), dim=-1)  # the logits stay alive beside it
    # Position j predicts token j + 1: completion tokens prompt_len.. are scored from prompt_len - 1 .. L - 2.
    scored_B_T_V = logprobs_B_L_V[:, prompt_len - 1 : -1]
    top_logprobs_B_T_K, top_ids_B_T_K = scored_B_T_V.topk(top_k, dim=-1, sorted=True)
    token_logprobs_B_T = scored_B_T_V.gather(-1, input_ids_B_L[:, prompt_len:, None])[..., 0]
    return {
        "top_logprobs_N_K": top_logprobs_B_T_K.flatten(0, 1).cpu().numpy(),
        "top_ids_N_K": top_ids_B_T_K.flatten(0, 1).cpu().numpy(),
        "token_logprobs_N": token_logprobs_B_T.flatten().cpu().numpy(),
    }


# ---- measuring ------------------------------------------------------------------------------------


class MemoryProbe:
    """Peak memory above the level at entry: RSS (sampled + VmHWM) on CPU, allocator peak on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self._stop = threading.Event()
        self._sampled_peak_kib = 0
        self._samples = 0

    def __enter__(self) -> MemoryProbe:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
            return self
        _release_free_heap()
        self._baseline_kib = _status_kib("VmRSS")
        self._hwm_before_kib = _status_kib("VmHWM")
        self._sampled_peak_kib = self._baseline_kib
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._peak = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        self._thread.join()
        self._hwm_after_kib = _status_kib("VmHWM")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled_peak_kib = max(self._sampled_peak_kib, _status_kib("VmRSS"))
            self._samples += 1
            self._stop.wait(SAMPLE_INTERVAL_S)

    def report(self) -> dict:
        if self.cuda:
            return {
                "memory_source": "torch.cuda.max_memory_allocated",
                "baseline_mib": self._baseline / MIB,
                "peak_over_baseline_mib": (self._peak - self._baseline) / MIB,
            }
        sampled = (self._sampled_peak_kib - self._baseline_kib) / 1024
        hwm_raised = self._hwm_after_kib > self._hwm_before_kib
        hwm = (self._hwm_after_kib - self._baseline_kib) / 1024 if hwm_raised else None
        return {
            "memory_source": "rss",
            "baseline_mib": self._baseline_kib / 1024,
            "hwm_before_mib": self._hwm_before_kib / 1024,
            "hwm_after_mib": self._hwm_after_kib / 1024,
            "peak_over_baseline_sampled_mib": sampled,
            "peak_over_baseline_hwm_mib": hwm,  # None: scoring stayed under the high-water mark of loading
            "peak_over_baseline_mib": max(sampled, hwm or 0.0),
            "rss_samples": self._samples,
        }


def _status_kib(field: str) -> int:
    """A `Vm*` line of /proc/self/status, in KiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (the CPU memory bench needs Linux)")


def _release_free_heap() -> None:
    # glibc keeps small freed blocks (from loading) in its heap; scoring could reuse them without RSS
    # growing, which would under-count it. Returning them to the OS first makes the baseline honest.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ---- CLI ------------------------------------------------------------------------------------------


def register(bench_subparsers) -> None:
    """Add `memory` to the `opd bench` subcommands."""
    parser = bench_subparsers.add_parser(
        "memory", help="peak memory of scoring: chunked top-k vs full logits (docs/benchmarks.md)"
    )
    _add_flags(parser)
    parser.set_defaults(func=main_from_args)


def _add_flags(parser: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    parser.add_argument("--model", default=d.model, help="embedded teacher name or HF directory")
    parser.add_argument("--batch", type=int, default=d.batch)
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--prompt-len", type=int, default=d.prompt_len, help="tokens before the scored ones")
    parser.add_argument("--top-k", type=int, default=d.top_k)
    parser.add_argument(
        "--chunk-tokens", type=int, default=d.chunk_tokens, help="HFLimits.logits_block_tokens"
    )
    parser.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens)
    parser.add_argument("--device", default=d.device, help="auto|cpu|cuda")
    parser.add_argument("--dtype", default=d.dtype, help="auto|float32|bfloat16")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--json-out", type=Path, help="also write the full result as JSON here")


def main_from_args(args: argparse.Namespace) -> int:
    result = run_memory_bench(
        batch=args.batch, seq_len=args.seq_len, prompt_len=args.prompt_len, top_k=args.top_k,
        chunk_tokens=args.chunk_tokens, device=args.device, dtype=args.dtype, model=args.model,
        max_batch_tokens=args.max_batch_tokens, seed=args.seed,
    )  # fmt: skip
    print(format_table(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def format_table(result: dict) -> str:
    cfg, theory, agree = result["config"], result["theory_mib"], result["agreement"]
    lines = [
        f"{cfg['batch']} x {cfg['seq_len']} tokens (prompt {cfg['prompt_len']}), top-k {cfg['top_k']}, "
        f"chunk {cfg['chunk_tokens']}, {cfg['model']}",
        f"{'variant':<8} {'peak MiB over baseline':>23} {'(sampled / hwm)':>20} {'baseline MiB':>13} {'score s':>8}",
    ]
    for name, v in result["variants"].items():
        sampled, hwm = v.get("peak_over_baseline_sampled_mib"), v.get("peak_over_baseline_hwm_mib")
        views = "-" if sampled is None else f"{sampled:.0f} / {'-' if hwm is None else f'{hwm:.0f}'}"
        lines.append(
            f"{name:<8} {v['peak_over_baseline_mib']:>23.0f} {views:>20} {v['baseline_mib']:>13.0f} {v['score_s']:>8.1f}"
        )
    lines += [
        f"agreement: top-k logprobs max |diff| {agree['top_logprobs_max_abs_diff']:.2e}, token logprobs "
        f"{agree['token_logprobs_max_abs_diff']:.2e}, top ids equal {100 * agree['top_ids_equal_fraction']:.2f}%",
        f"theory (fp32): full logits {theory['full_logits']:.0f} MiB (+ log-softmax "
        f"{theory['full_logits_plus_log_softmax']:.0f}), one chunk {theory['chunk_logits']:.0f} MiB "
        f"(+ log-softmax {theory['chunk_logits_plus_log_softmax']:.0f})"
        + (f", KV cache built by the forward {theory['kv_cache']:.0f} MiB" if "kv_cache" in theory else ""),
    ]
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd_bench.memory", description=__doc__.split("\n")[0])
    _add_flags(parser)
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant here and print one JSON line")
    parser.add_argument("--arrays-out", type=Path, help="with --variant: save its top-k arrays (npz)")
    args = parser.parse_args(argv)
    if args.variant is None:
        return main_from_args(args)
    cfg = BenchConfig(**{name: getattr(args, name) for name in asdict(BenchConfig())})
    print(json.dumps(run_variant(cfg, args.variant, args.arrays_out)))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
