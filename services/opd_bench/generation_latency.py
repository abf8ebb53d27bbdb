"""`opd bench generation-latency`: score latency while another client generates, versus idle.

One real `opd serve-teacher` process (the embedded teacher by default). In order:
- idle: `clients` threads each send `requests` score requests one after another, nothing else running;
- generation alone: one greedy `/v1/completions` of `generation_tokens` tokens (ignore_eos), nothing else;
- together: the same generation again, and once it decodes (opd_generated_tokens_total moved) the same
  score load as idle.
Reported: score latency p50 / p90 / max idle and during the generation, their ratio (the target is at most
2x), how many score answers came before the generation ended, and the generation's tokens/s alone and with
the score load (it gets one decode step between two score batches). Results in docs/serving.md.
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

import httpx
import numpy as np

from opd_common.dataclass_flags import add_dataclass_flags, dataclass_from_args
from opd_common.embedded import DEFAULT_TEACHER
from opd_common.launch import LocalTeacher, start_teacher


@dataclass(frozen=True)
class GenerationLatencyConfig:
    model: str = DEFAULT_TEACHER  # embedded teacher name or HF directory
    generation_tokens: int = 512  # tokens the concurrent generation draws (greedy, ignore_eos)
    seq_len: int = 256  # tokens per scored sequence (teacher view: prompt + completion)
    prompt_len: int = 64  # of which prompt
    top_k: int = 20  # top-k logprobs per scored position
    clients: int = 1  # threads sending score requests one after another, idle and during the generation
    requests: int = 10  # score requests per client in each phase
    dtype: str = "float32"  # the service's --dtype
    device: str = "cpu"  # the service's --device
    seed: int = 0  # of the scored token ids


def run(cfg: GenerationLatencyConfig) -> dict:
    extra = ["--dtype", cfg.dtype, "--device", cfg.device]
    if cfg.generation_tokens > 2048:  # the service's default --max-generation-tokens
        extra += ["--max-generation-tokens", str(cfg.generation_tokens)]
    with tempfile.TemporaryDirectory() as tmp:
        teacher = start_teacher(Path(tmp), [cfg.model], api_key="bench", extra_args=extra)
        try:
            return _measure(teacher, cfg)
        finally:
            teacher.stop()


def _measure(teacher: LocalTeacher, cfg: GenerationLatencyConfig) -> dict:
    headers = {"Authorization": f"Bearer {teacher.api_key}"}
    model = httpx.get(f"{teacher.http_url}/v1/models", headers=headers).json()["data"][0]
    rng = np.random.default_rng(cfg.seed)
    lock = threading.Lock()

    def score_body() -> dict:
        with lock:
            ids = rng.integers(0, model["tokenizer_vocab_size"] or model["vocab_size"], cfg.seq_len).tolist()
        seq = {"token_ids": ids, "prompt_len": cfg.prompt_len}
        return {"model": model["id"], "sequences": [seq], "top_k": cfg.top_k, "format": "binary"}

    def score(client: httpx.Client) -> float:
        body = score_body()
        started = time.perf_counter()
        r = client.post(f"{teacher.http_url}/v1/score", json=body, headers=headers, timeout=3600)
        r.raise_for_status()
        return time.perf_counter() - started

    def generate(client: httpx.Client, tokens: int) -> float:
        body = {"model": model["id"], "prompt": "Once upon a time", "max_tokens": tokens}
        body.update(temperature=0, ignore_eos=True)
        started = time.perf_counter()
        r = client.post(f"{teacher.http_url}/v1/completions", json=body, headers=headers, timeout=3600)
        r.raise_for_status()
        assert r.json()["usage"]["completion_tokens"] == tokens, r.text
        return time.perf_counter() - started

    def score_clients(generation: threading.Thread | None) -> list[tuple[float, bool]]:
        """(latency, answered while the generation ran) of each client's requests, one after another."""
        out: list[tuple[float, bool]] = []

        def one_client() -> None:
            with httpx.Client() as c:
                for _ in range(cfg.requests):
                    latency = score(c)
                    with lock:
                        out.append((latency, generation is not None and generation.is_alive()))

        threads = [threading.Thread(target=one_client) for _ in range(cfg.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    with httpx.Client() as client:
        score(client), score(client), generate(client, 8)  # warm-up: first forwards allocate
        idle = [latency for latency, _ in score_clients(None)]
        alone_s = generate(client, cfg.generation_tokens)

    together: dict[str, float] = {}

    def timed_generation() -> None:
        with httpx.Client() as c:
            together["s"] = generate(c, cfg.generation_tokens)

    before = _generated_tokens(teacher, headers)
    generation = threading.Thread(target=timed_generation)
    generation.start()
    if before < 0:  # a service without the metric (older versions): give the prompt's forward 2 s
        time.sleep(2.0)
    deadline = time.monotonic() + 600
    while 0 <= _generated_tokens(teacher, headers) == before and time.monotonic() < deadline:
        time.sleep(0.01)  # until it decodes
    during = score_clients(generation)
    generation.join()

    idle_s = _summary(idle)
    during_s = _summary([latency for latency, _ in during])
    return {
        "config": asdict(cfg),
        "idle": idle_s,
        "during_generation": during_s,
        "ratio": {k: during_s[k] / idle_s[k] for k in ("p50", "p90", "max")},
        "answered_before_generation_ended": sum(running for _, running in during),
        "generation_tokens_per_s": {
            "alone": cfg.generation_tokens / alone_s,
            "with_scoring": cfg.generation_tokens / together["s"],
        },
    }


def _generated_tokens(teacher: LocalTeacher, headers: dict) -> float:
    text = httpx.get(f"{teacher.http_url}/metrics", headers=headers).text
    lines = [line for line in text.splitlines() if line.startswith("opd_generated_tokens_total{")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines) if lines else -1.0


def _summary(latencies: list[float]) -> dict:
    if not latencies:
        return {"n": 0, "p50": float("nan"), "p90": float("nan"), "max": float("nan")}
    ordered = sorted(latencies)
    return {
        "n": len(ordered),
        "p50": statistics.median(ordered),
        "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "max": ordered[-1],
    }


def print_report(result: dict) -> None:
    cfg = result["config"]
    print(
        f"score requests: 1 x {cfg['seq_len']} tokens (prompt {cfg['prompt_len']}), top_k {cfg['top_k']}; "
        f"generation: {cfg['generation_tokens']} tokens, {cfg['clients']} score clients meanwhile"
    )
    print(f"{'':<20}{'n':>5}{'p50 ms':>10}{'p90 ms':>10}{'max ms':>10}")
    for name in ("idle", "during_generation"):
        s = result[name]
        print(f"{name:<20}{s['n']:>5}{1e3 * s['p50']:>10.1f}{1e3 * s['p90']:>10.1f}{1e3 * s['max']:>10.1f}")
    r = result["ratio"]
    print(f"{'ratio':<20}{'':>5}{r['p50']:>10.2f}{r['p90']:>10.2f}{r['max']:>10.2f}")
    n = result["during_generation"]["n"]
    print(f"answered before the generation ended: {result['answered_before_generation_ended']} of {n}")
    g = result["generation_tokens_per_s"]
    print(f"generation tokens/s: alone {g['alone']:.1f}, with scoring {g['with_scoring']:.1f}")


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "generation-latency",
        help="score latency during a concurrent long generation vs idle (docs/serving.md)",
    )
    add_dataclass_flags(p, GenerationLatencyConfig, defaults_from_cls=True)
    p.add_argument("--json-out", type=Path, help="also write the full result as JSON here")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    result = run(dataclass_from_args(GenerationLatencyConfig, args))
    print_report(result)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # python -m opd_bench.generation_latency [flags]: the same as the opd subcommand
    import sys

    parser = argparse.ArgumentParser(prog="python -m opd_bench.generation_latency")
    register(parser.add_subparsers(required=True))
    raise SystemExit(main(parser.parse_args(["generation-latency", *sys.argv[1:]])))
