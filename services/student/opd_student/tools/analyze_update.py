"""`opd analyze-update BEFORE AFTER`: the command line of the sparse-update report.

update_analysis.py compares the weights; update_report.py renders what it found.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from opd_student.tools.update_analysis import DEFAULT_THRESHOLD, UpdateError, analyze, resolve_input
from opd_student.tools.update_report import JSON_NAME, MD_NAME, PNG_NAME, render_text, write_outputs


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze-update",
        help="which parameters training changed: fraction unchanged and relative update norm",
        description="Compare two sets of weights (HF model directories, training checkpoints "
        "step-NNNNNN, or .safetensors files; 'default' = the default student) tensor by tensor: entries "
        "with |after - before| <= --threshold count as unchanged; ||delta|| / ||before|| per parameter, "
        "aggregated by module type and by layer.",
    )
    p.add_argument("before", metavar="BEFORE", help="weights before training (e.g. default)")
    p.add_argument("after", metavar="AFTER", help="weights after training (e.g. RUN/final)")
    p.add_argument(
        "--threshold", type=float, default=DEFAULT_THRESHOLD, help="largest |delta| counted unchanged"
    )
    p.add_argument("--out", type=Path, help=f"write {JSON_NAME}, {MD_NAME} and {PNG_NAME} here")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    try:
        before = resolve_input(args.before, "BEFORE")
        after = resolve_input(args.after, "AFTER")
        report = analyze(before, after, args.threshold)
    except UpdateError as e:
        raise SystemExit(f"opd analyze-update: {e}") from None
    print(render_text(report))
    if args.out is not None:
        for path in write_outputs(report, args.out):
            print(f"wrote {path}")
