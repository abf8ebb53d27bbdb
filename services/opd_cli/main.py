"""The `opd` command: one entry point whose subcommands live with the package that owns them."""

from __future__ import annotations

import os

# Before anything imports torch: idle OpenMP threads sleep instead of spinning. The teacher service and the
# trainer share the cores in `opd demo`; with spinning (the default) each slowed the other 5-8x here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402

from opd_cli import bench  # noqa: E402
from opd_student import cli as student_cli
from opd_teacher import cli as teacher_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opd", description="On-policy distillation: teacher service and trainer."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    teacher_cli.register(sub)
    student_cli.register(sub)
    bench.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    code = args.func(args)
    if isinstance(code, int) and code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
