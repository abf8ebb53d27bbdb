"""What `opd analyze-update` prints and writes: text and markdown tables, update.json, a heatmap.

The report is the dict `update_analysis.analyze` returns; nothing here reads weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from opd_student.tools.update_analysis import NO_LAYER

JSON_NAME, MD_NAME, PNG_NAME = "update.json", "update.md", "update_heatmap.png"


_COLUMNS = ("tensors", "entries", "unchanged", "frac unchanged", "rel update norm", "max |Δ|")


def _row(label: str, d: dict[str, Any]) -> list[str]:
    rel = d["relative_update_norm"]
    return [
        label,
        str(d["tensors"]),
        str(d["numel"]),
        str(d["unchanged"]),
        f"{d['fraction_unchanged']:.4f}",
        "n/a" if rel is None else f"{rel:.3e}",
        f"{d['max_abs_delta']:.3e}",
    ]


def group_tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for the by-type, by-layer and by-module tables; the total closes each."""
    total = _row("total", report["total"])
    return [
        ("by module type", ["type", *_COLUMNS], [_row(g["type"], g) for g in report["by_type"]] + [total]),
        (
            "by layer",
            ["layer", *_COLUMNS],
            [_row(_layer_label(g["layer"]), g) for g in report["by_layer"]] + [total],
        ),
        ("by module", ["module", *_COLUMNS], [_row(g["module"], g) for g in report["by_module"]] + [total]),
    ]


def _layer_label(key: str) -> str:
    return "no layer" if key == NO_LAYER else key


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    cells = [[c.replace("|", "\\|") for c in r] for r in [header, *rows]]  # "max |Δ|" must not split a cell
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells[1:]])


def _preamble(report: dict[str, Any]) -> list[str]:
    t = report["total"]
    lines = [
        f"BEFORE: {report['before']}",
        f"AFTER:  {report['after']}",
        f"unchanged means |after - before| <= {report['threshold']:g}; "
        f"{t['tensors']} tensors compared, {t['fraction_unchanged']:.4f} of {t['numel']} entries unchanged",
    ]
    for side in ("before", "after"):
        only = report[f"only_in_{side}"]
        if only:
            lines.append(f"{len(only)} tensors only in {side.upper()} (not compared), e.g. {only[0]}")
    return lines


_GEOMETRY_COLUMNS = (
    "matrices",
    "rank/r",
    "eff rank/r",
    "top energy",
    "principal L",
    "(random)",
    "principal R",
    "(random)",
    "near-zero energy",
    "near-zero changed",
)


def geometry_table(report: dict[str, Any]) -> tuple[str, list[str], list[list[str]]] | None:
    """Medians per module type of update_geometry's measures, each principal share beside its random one."""
    g = report.get("geometry")
    if g is None:
        return None

    def cell(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    def row(label: str, d: dict[str, Any]) -> list[str]:
        keys = (
            "rank_fraction",
            "effective_rank_fraction",
            "top_energy",
            "principal_left",
            "random_left",
            "principal_right",
            "random_right",
            "near_zero_energy",
            "near_zero_changed",
        )
        return [label, str(d["matrices"]), *(cell(d[k]) for k in keys)]

    title = (
        f"update geometry (medians over matrices; top energy: top {g['energy_top_fraction']:.0%} of "
        f"directions; principal: top {g['principal_fraction']:.0%} singular vectors of BEFORE; near zero: "
        f"the {g['near_zero_fraction']:.0%} smallest |BEFORE|)"
    )
    rows = [row(r["type"], r) for r in g["by_type"]] + [row("total", g["total"])]
    return title, ["type", *_GEOMETRY_COLUMNS], rows


def _mask_line(report: dict[str, Any]) -> list[str]:
    m = report.get("mask")
    if m is None:
        return []
    return [
        f"mask of changed entries (|delta| > {m['threshold']:g}): {m['path']}, {m['fraction_changed']:.4f} of {m['numel']} entries"
    ]


def render_text(report: dict[str, Any]) -> str:
    parts = ["\n".join(_preamble(report) + _mask_line(report))]
    tables = group_tables(report) + [t for t in [geometry_table(report)] if t is not None]
    parts += [f"{title}:\n{text_table(header, rows)}" for title, header, rows in tables]
    return "\n\n".join(parts)


def render_markdown(report: dict[str, Any]) -> str:
    lines = _preamble(report) + _mask_line(report)
    parts = ["# opd analyze-update", "\n".join(f"- {line}" for line in lines)]
    for title, header, rows in group_tables(report) + [t for t in [geometry_table(report)] if t is not None]:
        parts += [f"## {title[0].upper() + title[1:]}", markdown_table(header, rows)]
    return "\n\n".join(parts) + "\n"


def plot_heatmap(report: dict[str, Any], png_path: Path) -> None:
    """Layers × module types, colour = fraction unchanged, each cell annotated with it and the rel. norm."""
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure

    layers = [g["layer"] for g in report["by_layer"]]
    types = [g["type"] for g in report["by_type"]]
    frac = np.full((len(layers), len(types)), np.nan)
    rel: dict[tuple[int, int], float | None] = {}
    for cell in report["by_layer_type"]:
        i, j = layers.index(cell["layer"]), types.index(cell["type"])
        frac[i, j] = cell["fraction_unchanged"]
        rel[(i, j)] = cell["relative_update_norm"]
    fig = Figure(figsize=(2 + 1.6 * len(types), 1.5 + 0.42 * len(layers)), dpi=100, layout="constrained")
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.92")  # light grey: no such parameters
    image = ax.imshow(np.ma.masked_invalid(frac), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for (i, j), r in rel.items():
        colour = "black" if frac[i, j] > 0.6 else "white"
        note = "n/a" if r is None else f"{r:.1e}"
        ax.text(j, i, f"{frac[i, j]:.3f}\n{note}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(len(types)), types)
    ax.set_yticks(range(len(layers)), [_layer_label(k) for k in layers])
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    ax.set_title(f"fraction unchanged (|Δ| ≤ {report['threshold']:g}); second line ‖Δ‖/‖before‖", fontsize=9)
    fig.colorbar(image, ax=ax, label="fraction unchanged")
    fig.savefig(png_path, format="png")


def write_outputs(report: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / JSON_NAME, out_dir / MD_NAME, out_dir / PNG_NAME]
    paths[0].write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    paths[1].write_text(render_markdown(report), encoding="utf-8")
    plot_heatmap(report, paths[2])
    return paths
