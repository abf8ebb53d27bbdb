"""The mask of changed coordinates: written by `opd analyze-update --mask FILE`, read by `opd train
--update-mask FILE` (methods/update_mask.py), which retrains updating only those coordinates.

The file is a .safetensors of bool tensors named like the parameters, True where |after − before| >
threshold (the complement of analyze-update's "unchanged", so its fraction of True is 1 − fraction
unchanged); its metadata holds the threshold and the two sides compared.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

MASK_FORMAT = "opd-update-mask-v1"


def write_mask(
    before_files: dict[str, Path],
    after_files: dict[str, Path],
    names: list[str],
    threshold: float,
    path: Path,
    sides: tuple[str, str],
) -> dict[str, Any]:
    """Write the mask of `names`; returns {"path", "threshold", "changed", "numel", "fraction_changed"}."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from opd_student.tools.update_analysis import CHUNK_ENTRIES

    masks: dict[str, torch.Tensor] = {}
    changed = numel = 0
    for name in names:
        with (
            safe_open(before_files[name], framework="pt") as fb,
            safe_open(after_files[name], framework="pt") as fa,
        ):
            sb, sa = fb.get_slice(name), fa.get_slice(name)
            shape = list(sb.get_shape())
            if not shape:
                parts = [_changed(fb.get_tensor(name), fa.get_tensor(name), threshold).reshape(())]
            else:  # row chunks, as analyze() reads them
                rows = max(1, CHUNK_ENTRIES // max(1, math.prod(shape[1:])))
                parts = [
                    _changed(sb[s : s + rows], sa[s : s + rows], threshold) for s in range(0, shape[0], rows)
                ]
        mask = torch.cat(parts) if shape else parts[0]
        masks[name] = mask.contiguous()
        changed += int(mask.sum())
        numel += mask.numel()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": MASK_FORMAT,
        "threshold": repr(threshold),
        "before": sides[0],
        "after": sides[1],
    }
    save_file(masks, path, metadata=metadata)
    return {
        "path": str(path),
        "threshold": threshold,
        "changed": changed,
        "numel": numel,
        "fraction_changed": changed / numel if numel else 0.0,
    }


def _changed(before, after, threshold: float):
    import torch

    dtype = torch.float64 if torch.float64 in (before.dtype, after.dtype) else torch.float32
    return (after.to(dtype) - before.to(dtype)).abs() > threshold


def read_mask(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """({name: bool tensor}, metadata); a file that is not such a mask is refused with the reason."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(
            f"update mask {path} does not exist (write one: opd analyze-update BEFORE AFTER --mask FILE)"
        )
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != MASK_FORMAT:
        raise ValueError(
            f"{path} is not an update mask written by opd analyze-update --mask (metadata {json.dumps(metadata)})"
        )
    masks = load_file(path)
    for name, mask in masks.items():
        if mask.dtype != torch.bool:
            raise ValueError(f"{path}: {name} is {mask.dtype}, not a bool mask")
    return masks, metadata
