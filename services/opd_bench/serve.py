"""`opd bench serve`: the service's throughput under concurrent clients versus the raw batched forward.

In one run, on the same machine and the same tokens:
- raw: HFBackend.score in this process, the request pool cut into batches of max_batch_tokens (what the
  service could do at best: no HTTP, no queue, no serialisation);
- service: a real `opd serve-teacher` process, and N client threads (1, 8, 32) each sending single-sequence
  requests one after another through the real HTTP and gRPC clients, with the default payload format.
The raw forward runs while the service process is idle, and the service runs while this process only
drives clients, so the two never share the cores. Reported: scored tokens/s, service/raw, p50/p99
latency, and bytes per scored token of each payload format.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np

from opd_client import convert, schema
from opd_client.grpc_client import GrpcTeacherClient
from opd_client.http_client import HttpTeacherClient
from opd_client.v1 import teacher_pb2_grpc as pb_grpc
from opd_common.embedded import DEFAULT_TEACHER
from opd_common.launch import start_teacher


@dataclass(frozen=True)
class ServeBenchConfig:
    model: str = DEFAULT_TEACHER
    clients: tuple[int, ...] = (1, 8, 32)
    transports: tuple[str, ...] = ("http", "grpc")
    seq_len: int = 256
    prompt_len: int = 64
    rollouts: int = 1  # consecutive sequences sharing one prompt (1: distinct prompts, no prompt reuse)
    prefix_reuse: bool = True
    top_k: int = 20
    # what each request asks for: "topk" (top_k logprobs) and/or "hidden" (bf16 hidden states, top_k = 0,
    # the exact signal's request; the trainer's exact losses add the top-k to it)
    signals: tuple[str, ...] = ("topk", "hidden")
    requests_per_client: int = 2
    min_requests: int = 8  # a run sends at least this many requests (1 client alone is noisy)
    max_batch_tokens: int = 8192
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0


SIGNAL_OPTIONS = {
    "topk": {},
    "hidden": {"return_hidden": True, "hidden_dtype": "bfloat16"},
}


def score_options(signal: str, top_k: int) -> dict:
    """client.score keyword arguments of one signal."""
    return {"top_k": 0 if signal == "hidden" else top_k, **SIGNAL_OPTIONS[signal]}


@dataclass
class RunResult:
    name: str  # "raw", "http", "grpc"
    clients: int
    requests: int
    scored_tokens: int
    seconds: float
    latencies_s: list[float]
    signal: str = "topk"

    @property
    def tokens_per_s(self) -> float:
        return self.scored_tokens / self.seconds

    def row(self, raw: RunResult | None) -> dict:
        lat = sorted(self.latencies_s)
        return {
            "transport": self.name,
            "signal": self.signal,
            "clients": self.clients,
            "requests": self.requests,
            "scored_tokens_per_s": round(self.tokens_per_s, 1),
            "service_over_raw": round(self.tokens_per_s / raw.tokens_per_s, 3) if raw else None,
            "p50_s": round(_quantile(lat, 0.5), 3) if lat else None,
            "p99_s": round(_quantile(lat, 0.99), 3) if lat else None,
        }


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def make_pool(cfg: ServeBenchConfig, n: int, seed: int, vocab_size: int) -> list[dict]:
    """n random sequences; each run of `rollouts` consecutive ones shares its prompt (G rollouts)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, size=(n, cfg.seq_len))
    for start in range(0, n, cfg.rollouts):
        ids[start : start + cfg.rollouts, : cfg.prompt_len] = ids[start, : cfg.prompt_len]
    return [{"token_ids": row.tolist(), "prompt_len": cfg.prompt_len} for row in ids]


# ---- raw ----------------------------------------------------------------------------------------------


def run_raw(backend, pool: list[dict], cfg: ServeBenchConfig, signal: str = "topk") -> RunResult:
    from opd_teacher.backends.base import ScoreItem

    hidden = signal == "hidden"
    items = [
        ScoreItem(s["token_ids"][: cfg.prompt_len], s["token_ids"][cfg.prompt_len :], return_hidden=hidden)
        for s in pool
    ]
    per_batch = max(1, cfg.max_batch_tokens // cfg.seq_len)
    started = time.perf_counter()
    for i in range(0, len(items), per_batch):
        backend.score(items[i : i + per_batch], score_options(signal, cfg.top_k)["top_k"], 1.0)
    seconds = time.perf_counter() - started
    scored = sum(len(it.completion_ids) for it in items)
    return RunResult("raw", 0, len(items), scored, seconds, [], signal)


# ---- service ------------------------------------------------------------------------------------------


def run_service(
    teacher, transport: str, clients: int, pool: list[dict], cfg: ServeBenchConfig, signal: str = "topk"
) -> RunResult:
    """`clients` threads, each with its own client (own connection), share the pool in order."""
    options = score_options(signal, cfg.top_k)
    latencies: list[float] = []
    scored = [0]
    lock = threading.Lock()
    next_index = iter(range(len(pool)))
    errors: list[BaseException] = []

    def client_loop() -> None:
        client = _client(teacher, transport)
        try:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                result = client.score([pool[i]], **options)
                elapsed = time.perf_counter() - t0
                with lock:
                    latencies.append(elapsed)
                    scored[0] += result.scored_tokens
        except BaseException as e:  # noqa: BLE001 - reported after the run
            errors.append(e)
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{transport} with {clients} clients: {errors[0]!r}") from errors[0]
    return RunResult(transport, clients, len(pool), scored[0], seconds, latencies, signal)


def _client(teacher, transport: str):
    if transport == "http":
        return HttpTeacherClient(teacher.http_url, api_key=teacher.api_key, timeout=600)
    return GrpcTeacherClient(teacher.grpc_target, api_key=teacher.api_key, timeout=600)


# ---- payload size -------------------------------------------------------------------------------------


def payload_bytes(teacher, sequence: dict, top_k: int) -> dict[str, float]:
    """Bytes of the response body per scored token, for each way the scores can travel."""
    headers = {"Authorization": f"Bearer {teacher.api_key}"}
    body = {"sequences": [sequence], "top_k": top_k}
    scored = len(sequence["token_ids"]) - sequence["prompt_len"]
    variants: dict[str, tuple[dict[str, Any], dict[str, str]]] = {  # name: (body fields, headers)
        "json": ({"format": "json"}, {}),
        "binary (base64 JSON)": ({"format": "binary"}, {}),
        "protobuf": ({}, {"Accept": "application/x-protobuf"}),
        "protobuf float16": ({"logprob_dtype": "float16"}, {"Accept": "application/x-protobuf"}),
        "hidden bf16, protobuf": (
            {"top_k": 0, "return_hidden": True, "hidden_dtype": "bfloat16"},
            {"Accept": "application/x-protobuf"},
        ),
        "top-k + hidden bf16, protobuf": (
            {"return_hidden": True, "hidden_dtype": "bfloat16"},
            {"Accept": "application/x-protobuf"},
        ),
        "hidden float32, protobuf": (
            {"top_k": 0, "return_hidden": True, "hidden_dtype": "float32"},
            {"Accept": "application/x-protobuf"},
        ),
    }
    out = {}
    for name, (extra, extra_headers) in variants.items():
        response = httpx.post(
            f"{teacher.http_url}/v1/score",
            json={**body, **extra},
            headers={**headers, **extra_headers},
            timeout=120,
        )
        response.raise_for_status()
        out[name] = len(response.content) / scored
    with grpc.insecure_channel(teacher.grpc_target) as channel:
        stub = pb_grpc.TeacherStub(channel)
        grpc_variants: tuple[tuple[str, schema.LogprobDtype], ...] = (
            ("gRPC", "float32"),
            ("gRPC float16", "float16"),
        )
        for name, dtype in grpc_variants:
            req = schema.ScoreRequest(
                sequences=[schema.Sequence.model_validate(sequence)], top_k=top_k, logprob_dtype=dtype
            )
            response = stub.Score(
                convert.score_request_to_proto(req),
                metadata=(("authorization", f"Bearer {teacher.api_key}"),),
                timeout=120,
            )
            out[name] = response.ByteSize() / scored
    return {k: round(v, 1) for k, v in out.items()}


# ---- the whole bench ----------------------------------------------------------------------------------


def run_serve_bench(cfg: ServeBenchConfig, workdir: Path) -> dict:
    from opd_teacher.backends.hf import HFBackend, HFLimits
    from opd_teacher.batcher import BatchLimits

    limits = HFLimits(prefix_reuse=cfg.prefix_reuse)
    batch = BatchLimits(max_batch_tokens=cfg.max_batch_tokens)
    backend = HFBackend("raw", cfg.model, dtype=cfg.dtype, device=cfg.device, limits=limits, batch=batch)
    vocab = backend.info.vocab_size
    warm = make_pool(cfg, 2, cfg.seed + 999, vocab)
    run_raw(backend, warm, cfg)
    print(f"raw forward: {cfg.model} {backend.info.dtype} on {backend.info.device}", flush=True)

    flags = ["--dtype", cfg.dtype, "--device", cfg.device, "--max-batch-tokens", str(cfg.max_batch_tokens)]
    flags += [] if cfg.prefix_reuse else ["--no-prefix-reuse"]
    rows, raws = [], {}
    with start_teacher(workdir, [cfg.model], api_key="bench-key", extra_args=flags) as teacher:
        for transport in cfg.transports:  # warm the service and its connections
            run_service(teacher, transport, 2, warm, cfg)
        for n, clients in enumerate(cfg.clients):
            requests = max(cfg.min_requests, clients * cfg.requests_per_client)
            pool = make_pool(cfg, requests, cfg.seed + n, vocab)
            for signal in cfg.signals:
                raw = run_raw(backend, pool, cfg, signal)
                raws[clients, signal] = raw
                rows.append(raw.row(None) | {"clients": clients})
                _progress(rows[-1])
                for transport in cfg.transports:
                    rows.append(run_service(teacher, transport, clients, pool, cfg, signal).row(raw))
                    _progress(rows[-1])
        payload = payload_bytes(teacher, make_pool(cfg, 1, cfg.seed + 500, vocab)[0], cfg.top_k)
    return {"config": asdict(cfg), "runs": rows, "bytes_per_scored_token": payload}


def _progress(row: dict) -> None:
    print(json.dumps(row), flush=True)


def format_table(result: dict) -> str:
    lines = [
        "| clients | signal | transport | requests | scored tokens/s | service / raw | p50 s | p99 s |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        ratio = "" if r["service_over_raw"] is None else f"{r['service_over_raw']:.3f}"
        p50 = "" if r["p50_s"] is None else f"{r['p50_s']:.2f}"
        p99 = "" if r["p99_s"] is None else f"{r['p99_s']:.2f}"
        lines.append(
            f"| {r['clients']} | {r['signal']} | {r['transport']} | {r['requests']} | {r['scored_tokens_per_s']:.0f} | "
            f"{ratio} | {p50} | {p99} |"
        )
    k = result["config"]["top_k"]
    lines += ["", f"| payload (top_k = {k}) | bytes / scored token |", "|---|---:|"]
    lines += [f"| {name} | {value:.1f} |" for name, value in result["bytes_per_scored_token"].items()]
    return "\n".join(lines)


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "serve",
        help="service throughput under 1/8/32 clients vs the raw batched forward (docs/benchmarks.md)",
    )
    d = ServeBenchConfig()
    p.add_argument("--model", default=d.model, help="embedded teacher name or HF directory")
    p.add_argument("--clients", default=",".join(map(str, d.clients)), help="comma-separated client counts")
    p.add_argument("--transports", default=",".join(d.transports), help="http,grpc")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--prompt-len", type=int, default=d.prompt_len)
    p.add_argument(
        "--rollouts",
        type=int,
        default=d.rollouts,
        help="consecutive sequences sharing one prompt, like G rollouts per prompt (1: all prompts distinct)",
    )
    p.add_argument(
        "--no-prefix-reuse", dest="prefix_reuse", action="store_false", help="both raw and service"
    )
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument(
        "--signals",
        default=",".join(d.signals),
        help="what requests ask for: topk (top-k logprobs), hidden (bf16 hidden states, top_k 0)",
    )
    p.add_argument("--requests-per-client", type=int, default=d.requests_per_client)
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens)
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--device", default=d.device)
    p.add_argument("--json-out", type=Path, help="also write the full result as JSON here")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cfg = ServeBenchConfig(
        model=args.model,
        clients=tuple(int(c) for c in args.clients.split(",")),
        transports=tuple(t.strip() for t in args.transports.split(",")),
        seq_len=args.seq_len,
        prompt_len=args.prompt_len,
        rollouts=args.rollouts,
        prefix_reuse=args.prefix_reuse,
        top_k=args.top_k,
        signals=tuple(t.strip() for t in args.signals.split(",")),
        requests_per_client=args.requests_per_client,
        max_batch_tokens=args.max_batch_tokens,
        dtype=args.dtype,
        device=args.device,
    )
    with tempfile.TemporaryDirectory(prefix="opd-bench-serve-") as tmp:
        result = run_serve_bench(cfg, Path(tmp))
    print(format_table(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    worst = min(
        (r["service_over_raw"] for r in result["runs"] if r["service_over_raw"] is not None), default=0
    )
    print(
        f"\nlowest service/raw: {worst:.3f}  (median over runs: "
        f"{statistics.median(r['service_over_raw'] for r in result['runs'] if r['service_over_raw']):.3f})"
    )
    return 0
