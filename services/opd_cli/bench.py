"""`opd bench ...`: the benchmarks whose figures are in docs/benchmarks.md."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (results in docs/benchmarks.md)")
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    from opd_student.compare import runner as compare
    from opd_teacher.bench import memory, serve

    memory.register(bench)
    serve.register(bench)
    compare.register(bench)
    from opd_student import scale_bench

    scale_bench.register(bench)
