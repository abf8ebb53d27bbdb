"""The geometry of an update, matrix by matrix: how the change ΔW = after − before of each weight matrix W
sits relative to W (`opd analyze-update --geometry`).

The measures follow *Dense Supervision, Sparse Updates: On the Sparsity and Geometry of On-Policy
Distillation* (arXiv 2606.13657), which finds OPD's updates "numerically full-rank but spectrally
concentrated", lying "mostly away from the principal singular subspaces of the source weights" and falling
"disproportionately on coordinates where the source weights are close to zero". The paper names the
measures, not every constant; ours (docs/methods.md says which are our choices):

- spectrum of ΔW, σ_1 ≥ … ≥ σ_r (r = min(m, n), float64 SVD):
  numerical rank = #{σ_i > σ_1 · max(m, n) · ε_fp32} (numpy's matrix_rank tolerance at float32, the
  precision the weights are stored in); effective rank = exp(−Σ p_i log p_i), p_i = σ_i / Σ σ_j (Roy &
  Vetterli 2007); top energy = Σ_{i ≤ ⌈f_e·r⌉} σ_i² / Σ σ_i² (f_e = 1 %);
- alignment with W's principal subspaces: U_k, V_k the top-k singular vectors of W (k = ⌈f_p·r⌉), the share
  of ‖ΔW‖² inside them: left ‖U_kᵀ ΔW‖² / ‖ΔW‖², right ‖ΔW V_k‖² / ‖ΔW‖², both ‖U_kᵀ ΔW V_k‖² / ‖ΔW‖²;
  a ΔW of random direction has k/m, k/n and k²/(mn) (reported beside them);
- near-zero weights: the ⌈f_z·N⌉ entries of W smallest in |W| (all entries with |W| ≤ that one's value,
  so ties are kept together); the share of ‖ΔW‖² on them and the share of the changed entries
  (|ΔW| > threshold) on them, against f_z for an update blind to |W|.

Only 2-D tensors are matrices (vectors such as norms have no spectrum); tensors are read whole.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

ENERGY_TOP_FRACTION = 0.01  # f_e: the "top 1 % of directions"
PRINCIPAL_FRACTION = 0.01  # f_p: the principal subspace of W, as a fraction of its rank
NEAR_ZERO_FRACTION = 0.1  # f_z: the smallest-|W| share of entries counted as near zero
FP32_EPS = float(np.finfo(np.float32).eps)
MEASURES = (
    "rank_fraction",
    "effective_rank_fraction",
    "top_energy",
    "principal_left",
    "principal_right",
    "principal_both",
    "near_zero_energy",
    "near_zero_changed",
)


def matrix_geometry(
    before_M_N,
    delta_M_N,
    threshold: float,
    energy_top_fraction: float = ENERGY_TOP_FRACTION,
    principal_fraction: float = PRINCIPAL_FRACTION,
    near_zero_fraction: float = NEAR_ZERO_FRACTION,
) -> dict[str, Any]:
    """The measures of one matrix (torch tensors, W and ΔW); None where ΔW = 0 leaves them undefined."""
    import torch

    w = before_M_N.to(torch.float64)
    d = delta_M_N.to(torch.float64)
    m, n = d.shape
    r = min(m, n)
    k_energy = math.ceil(energy_top_fraction * r)
    k_principal = math.ceil(principal_fraction * r)
    out: dict[str, Any] = {
        "shape": [m, n],
        "k_energy": k_energy,
        "k_principal": k_principal,
        "random_left": k_principal / m,
        "random_right": k_principal / n,
        "random_both": k_principal * k_principal / (m * n),
        "near_zero_fraction_of_entries": None,
    }
    delta_sq = float((d * d).sum())
    abs_w = w.abs().flatten()
    k_zero = max(1, math.ceil(near_zero_fraction * abs_w.numel()))
    cutoff = float(torch.kthvalue(abs_w, k_zero).values)
    near_zero = (w.abs() <= cutoff).flatten()
    out["near_zero_fraction_of_entries"] = float(near_zero.double().mean())
    if delta_sq == 0.0:
        return out | dict.fromkeys(MEASURES) | {"rank": 0, "effective_rank": None}

    sigma = torch.linalg.svdvals(d)  # descending
    rank = int((sigma > sigma[0] * max(m, n) * FP32_EPS).sum())
    p = sigma / sigma.sum()
    p = p[p > 0]
    effective_rank = float(torch.exp(-(p * p.log()).sum()))
    energy = sigma * sigma
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    u_k, v_k = u[:, :k_principal], vh[:k_principal].T
    left = u_k.T @ d  # [k, n]
    changed = (d.abs() > threshold).flatten()
    n_changed = int(changed.sum())
    return out | {
        "rank": rank,
        "rank_fraction": rank / r,
        "effective_rank": effective_rank,
        "effective_rank_fraction": effective_rank / r,
        "top_energy": float(energy[:k_energy].sum() / energy.sum()),
        "principal_left": float((left * left).sum()) / delta_sq,
        "principal_right": float(((d @ v_k) ** 2).sum()) / delta_sq,
        "principal_both": float(((left @ v_k) ** 2).sum()) / delta_sq,
        "near_zero_energy": float((d.flatten()[near_zero] ** 2).sum()) / delta_sq,
        "near_zero_changed": (int((changed & near_zero).sum()) / n_changed) if n_changed else None,
    }


def geometry(
    before_files: dict[str, Path],
    after_files: dict[str, Path],
    names: list[str],
    threshold: float,
    kinds: dict[str, str],
    energy_top_fraction: float = ENERGY_TOP_FRACTION,
    principal_fraction: float = PRINCIPAL_FRACTION,
    near_zero_fraction: float = NEAR_ZERO_FRACTION,
) -> dict[str, Any]:
    """Per matrix of `names` (2-D tensors only) and, per module type (kinds: name → type) and in total, the
    median of each measure over the matrices (the paper reports medians)."""
    from safetensors import safe_open

    rows = []
    for name in names:
        with (
            safe_open(before_files[name], framework="pt") as fb,
            safe_open(after_files[name], framework="pt") as fa,
        ):
            if len(fb.get_slice(name).get_shape()) != 2:
                continue
            before = fb.get_tensor(name)
            after = fa.get_tensor(name)
        dtype = _compare_dtype(before, after)
        delta = after.to(dtype) - before.to(dtype)  # the difference as analyze() takes it
        measures = matrix_geometry(
            before, delta, threshold, energy_top_fraction, principal_fraction, near_zero_fraction
        )
        rows.append({"name": name, "type": kinds[name]} | measures)
    groups = {}
    for kind in dict.fromkeys(r["type"] for r in rows):
        groups[kind] = _medians([r for r in rows if r["type"] == kind])
    return {
        "energy_top_fraction": energy_top_fraction,
        "principal_fraction": principal_fraction,
        "near_zero_fraction": near_zero_fraction,
        "by_type": [{"type": k} | v for k, v in groups.items()],
        "total": _medians(rows),
        "matrices": rows,
    }


def _compare_dtype(before, after):
    import torch

    return torch.float64 if torch.float64 in (before.dtype, after.dtype) else torch.float32


def _medians(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"matrices": len(rows)}
    for key in (*MEASURES, "random_left", "random_right", "random_both"):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    return out
