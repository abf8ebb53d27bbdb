"""`opd bench ...`: the benchmarks whose figures are in docs/benchmarks.md (package opd_bench)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (results in docs/benchmarks.md)")
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    from opd_bench import (
        draft_acceptance,
        generation_latency,
        gpu_check,
        limits,
        memory,
        methods2,
        rollout_speed,
        scale,
        serve,
        train_memory,
        weight_push,
    )
    from opd_bench.compare import runner as compare
    from opd_bench.xtok import runner as xtok

    memory.register(bench)
    serve.register(bench)
    compare.register(bench)
    xtok.register(bench)
    scale.register(bench)
    train_memory.register(bench)
    generation_latency.register(bench)
    limits.register(bench)
    gpu_check.register(bench)
    weight_push.register(bench)
    methods2.register(bench)
    draft_acceptance.register(bench)
    rollout_speed.register(bench)
