"""`opd analyze-update BEFORE AFTER`: the command line of the sparse-update report.

update_analysis.py compares the weights; update_report.py renders what it found.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from opd_student.tools.update_analysis import (
    DEFAULT_THRESHOLD,
    UpdateError,
    analyze,
    resolve_input,
    tensor_files,
)
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
    p.add_argument(
        "--geometry",
        action="store_true",
        help="also per matrix: effective rank and top-1%% energy of the update's spectrum, its share in the "
        "principal singular subspaces of BEFORE, and on BEFORE's near-zero entries (SVDs: slower)",
    )
    p.add_argument(
        "--mask",
        type=Path,
        metavar="FILE",
        help="write the mask of changed entries (|delta| > --threshold) as .safetensors, for "
        "opd train --update-mask",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    try:
        before = resolve_input(args.before, "BEFORE")
        after = resolve_input(args.after, "AFTER")
        report = analyze(before, after, args.threshold)
        if args.geometry or args.mask is not None:
            report |= extras(before, after, report, args.threshold, args.geometry, args.mask)
    except UpdateError as e:
        raise SystemExit(f"opd analyze-update: {e}") from None
    print(render_text(report))
    if args.out is not None:
        for path in write_outputs(report, args.out):
            print(f"wrote {path}")


def extras(
    before: Path, after: Path, report: dict, threshold: float, with_geometry: bool, mask: Path | None
) -> dict:
    """The report's "geometry" (update_geometry.py) and "mask" (mask_file.py) entries, as asked."""
    from opd_student.tools.mask_file import write_mask
    from opd_student.tools.update_geometry import geometry

    before_files, after_files = tensor_files(before, "BEFORE"), tensor_files(after, "AFTER")
    names = [p["name"] for p in report["parameters"]]
    out: dict = {}
    if with_geometry:
        kinds = {p["name"]: p["type"] for p in report["parameters"]}
        out["geometry"] = geometry(before_files, after_files, names, threshold, kinds)
    if mask is not None:
        out["mask"] = write_mask(before_files, after_files, names, threshold, mask, (str(before), str(after)))
    return out
