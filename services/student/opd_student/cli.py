"""Subcommands owned by the student side: train, eval, make-student, report, demo, analyze-update,
codistill."""

from __future__ import annotations

import argparse
import logging
import sys

from opd_student import demo, evaluation
from opd_student.config import add_config_flags, config_from_args
from opd_student.tools import analyze_update, codistill, make_student, report, steering_vector


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="on-policy distillation of a student against a teacher service",
        description="Sample rollouts from the student, score them with the teacher service, apply the OPD "
        "loss. Settings: TrainConfig fields, from --config FILE (TOML/YAML) and/or flags.",
    )
    add_config_flags(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.set_defaults(func=train_main)
    evaluation.register(subparsers)
    make_student.register(subparsers)
    report.register(subparsers)
    demo.register(subparsers)
    analyze_update.register(subparsers)
    codistill.register(subparsers)
    steering_vector.register(subparsers)


def train_main(args: argparse.Namespace) -> None:
    from opd_student.distributed import world_from_env
    from opd_student.tools.report import write_report
    from opd_student.train import train

    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from e
    run_dir = train(cfg, resume=args.resume)
    if world_from_env().is_main:  # under torchrun, rank 0 alone writes the run's files
        png, md = write_report(run_dir)
        print(f"report: {png}, {md}")
