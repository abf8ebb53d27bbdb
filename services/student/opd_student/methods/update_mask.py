"""`update_mask = FILE`: train only the coordinates a mask marks, the others keep their starting values.

Dense Supervision, Sparse Updates (arXiv 2606.13657) finds that retraining from the source weights with
only the coordinates a full OPD run changed ("the discovered subnetwork") recovers nearly its performance.
The mask comes from `opd analyze-update BEFORE AFTER --mask FILE` (tools/mask_file.py); the run starts from
BEFORE (`student`), and after the gradients of each step are complete the frozen coordinates' gradients
are set to zero, before clipping (the clipped norm is that of the trained coordinates). With AdamW and no
weight decay a coordinate whose gradient is always zero has zero moments and never moves, bit for bit;
weight decay would still shrink it, so the two are refused together (methods/checks.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from opd_student.tools.mask_file import read_mask


class UpdateMask:
    def __init__(self, path: str | Path, named_parameters: list[tuple[str, torch.nn.Parameter]]) -> None:
        try:
            masks, self.metadata = read_mask(Path(path))
        except ValueError as e:
            raise SystemExit(f"error: update_mask: {e}") from None
        names = {name for name, _ in named_parameters}
        missing = sorted(names - set(masks))
        extra = sorted(set(masks) - names)
        if missing or extra:
            raise SystemExit(
                f"error: update mask {path} does not fit the student: "
                + (f"{len(missing)} parameters have no mask (e.g. {missing[0]!r})" if missing else "")
                + ("; " if missing and extra else "")
                + (f"{len(extra)} masks name no parameter (e.g. {extra[0]!r})" if extra else "")
            )
        # frozen (True = keep), by parameter identity: the loop hands over parameters, not names
        self.frozen: dict[int, torch.Tensor] = {}
        trained = total = 0
        for name, p in named_parameters:
            mask = masks[name]
            if tuple(mask.shape) != tuple(p.shape):
                raise SystemExit(
                    f"error: update mask {path}: {name!r} is {tuple(mask.shape)}, the parameter {tuple(p.shape)}"
                )
            self.frozen[id(p)] = (~mask).to(p.device)
            trained += int(mask.sum())
            total += mask.numel()
        self.trained_fraction = trained / total if total else 0.0

    def apply(self, params: list[torch.nn.Parameter]) -> dict[str, float]:
        """Zero the frozen coordinates' gradients (after accumulation, before clipping)."""
        for p in params:
            if p.grad is not None:
                p.grad.masked_fill_(self.frozen[id(p)], 0.0)
        return {"update/trained_fraction": self.trained_fraction}
