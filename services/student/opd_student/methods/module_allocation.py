"""`effopd = true`: after the first steps, train only the modules that moved most; freeze the rest.

*Learning to Foresee: Unveiling the Unlocking Efficiency of On-Policy Distillation* (arXiv 2605.11739)
observes that OPD settles early "at the module-allocation level": it "identifies regions with low marginal
utility and concentrates updates on modules that are more critical". Its EffOPD method proper extrapolates
along the current update direction; this option uses the allocation finding instead (our reading, as the
issue asks): after `effopd_probe_steps` optimizer steps, each parameter tensor's relative movement
s = ‖W_k − W_0‖ / ‖W_0‖ (W_0: the student's starting weights, read from its files) ranks the modules; the
fastest-moving ones are kept until they hold `effopd_keep_fraction` of the parameters, and the others stop
training (requires_grad off: no weight gradient is computed for them, which is where the time goes).

The decision is written to RUN/effopd.json, so a resumed run freezes the same modules.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

DECISION_FILE = "effopd.json"


def allocate(movement: dict[str, tuple[float, int]], keep_fraction: float) -> list[str]:
    """The names kept: by movement s descending (ties: name order), until their sizes reach keep_fraction of
    the total (the module that crosses it is kept). movement: {name: (s, numel)}."""
    total = sum(n for _, n in movement.values())
    kept, held = [], 0
    for name in sorted(movement, key=lambda k: (-movement[k][0], k)):
        if held >= keep_fraction * total:
            break
        kept.append(name)
        held += movement[name][1]
    return kept


def relative_movement(
    named_parameters: list[tuple[str, torch.nn.Parameter]], initial_files: list[Path]
) -> dict[str, tuple[float, int]]:
    """{name: (‖W − W_0‖ / ‖W_0‖, numel)} against the tensors of the same names in the student's files."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for f in initial_files:
        with safe_open(f, framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), f))
    out = {}
    for name, p in named_parameters:
        if name not in where:
            raise SystemExit(f"error: effopd: the student's files hold no {name!r} to measure its movement")
        with safe_open(where[name], framework="pt") as handle:
            w0 = handle.get_tensor(name).to(torch.float64)
        w = p.detach().to("cpu", torch.float64)
        norm0 = float(torch.linalg.vector_norm(w0))
        moved = float(torch.linalg.vector_norm(w - w0))
        out[name] = (moved / norm0 if norm0 > 0 else math.inf if moved > 0 else 0.0, p.numel())
    return out


class ModuleAllocation:
    def __init__(
        self,
        named_parameters: list[tuple[str, torch.nn.Parameter]],
        student_path: Path,
        run_dir: Path,
        probe_steps: int,
        keep_fraction: float,
    ) -> None:
        self.params = dict(named_parameters)
        self.student_path = Path(student_path)
        self.decision_path = Path(run_dir) / DECISION_FILE
        self.probe_steps = probe_steps
        self.keep_fraction = keep_fraction
        self.trained_fraction = 1.0

    def resume(self, step: int) -> None:
        """A run resumed after the probe freezes what it decided then."""
        if step >= self.probe_steps and self.decision_path.exists():
            self._freeze(json.loads(self.decision_path.read_text())["kept"])

    def after_step(self, step: int, is_main: bool = True) -> dict[str, float]:
        """After optimizer step `step` (1-based): decide at the end of the probe; the fraction trained."""
        metrics = {"effopd/trained_fraction": self.trained_fraction}
        if step != self.probe_steps:
            return metrics
        files = sorted(self.student_path.glob("*.safetensors"))
        movement = relative_movement(list(self.params.items()), files)
        kept = allocate(movement, self.keep_fraction)
        self._freeze(kept)
        if is_main:
            self.decision_path.write_text(
                json.dumps(
                    {
                        "probe_steps": self.probe_steps,
                        "keep_fraction": self.keep_fraction,
                        "kept": kept,
                        "movement": {k: v[0] for k, v in movement.items()},
                    },
                    indent=1,
                )
                + "\n"
            )
        return metrics | {"effopd/trained_fraction": self.trained_fraction, "effopd/kept_modules": len(kept)}

    def _freeze(self, kept: list[str]) -> None:
        keep = set(kept)
        for name, p in self.params.items():
            p.requires_grad_(name in keep)
        total = sum(p.numel() for p in self.params.values())
        self.trained_fraction = sum(self.params[k].numel() for k in keep) / total
