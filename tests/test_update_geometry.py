"""`opd analyze-update --geometry --mask`: every geometric measure against a direct numpy computation on a
tiny model with known edits, and the mask against the edited coordinates.

AFTER is the tiny model with: a rank-2 update of layer 0's q_proj (two random outer products), an update of
layer 1's up_proj inside the top-2 singular subspaces of W (U_2 · C · V_2ᵀ), +1e-3 on the 10 % of layer 2's
down_proj entries smallest in |W|, and layer 3's o_proj scaled by 1.01 (ΔW = 0.01 W: its spectrum is W's).
Everything else is identical.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.torch import save_file

Q0 = "model.layers.0.self_attn.q_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"
DOWN2 = "model.layers.2.mlp.down_proj.weight"
O3 = "model.layers.3.self_attn.o_proj.weight"
EDITED = (Q0, UP1, DOWN2, O3)


@pytest.fixture(scope="module")
def edited(tmp_path_factory, tiny_model_dir):
    before = load_file(tiny_model_dir / "model.safetensors")
    after = {n: v.copy() for n, v in before.items()}
    rng = np.random.default_rng(0)
    w = before[Q0].astype(np.float64)
    delta = 1e-3 * (np.outer(rng.normal(size=w.shape[0]), rng.normal(size=w.shape[1])))
    delta += 5e-4 * np.outer(rng.normal(size=w.shape[0]), rng.normal(size=w.shape[1]))
    after[Q0] = (w + delta).astype(np.float32)
    w = before[UP1].astype(np.float64)
    u, _, vh = np.linalg.svd(w, full_matrices=False)
    after[UP1] = (w + u[:, :2] @ np.array([[2e-3, 5e-4], [-1e-3, 1e-3]]) @ vh[:2]).astype(np.float32)
    w = before[DOWN2]
    k = math.ceil(0.1 * w.size)
    cutoff = np.partition(np.abs(w).ravel(), k - 1)[k - 1]
    after[DOWN2] = np.where(np.abs(w) <= cutoff, w + np.float32(1e-3), w).astype(np.float32)
    after[O3] = before[O3] * np.float32(1.01)
    after_dir = tmp_path_factory.mktemp("geometry-after")
    save_file({n: torch.from_numpy(v) for n, v in after.items()}, after_dir / "model.safetensors")
    shutil.copy(tiny_model_dir / "config.json", after_dir / "config.json")
    return tiny_model_dir, after_dir, before, after


def direct(w32: np.ndarray, a32: np.ndarray, threshold: float = 1e-5) -> dict:
    """The measures of update_geometry's docstring, in numpy float64."""
    d = a32.astype(np.float32) - w32.astype(np.float32)  # the difference the tool takes (float32)
    d, w = d.astype(np.float64), w32.astype(np.float64)
    m, n = d.shape
    r = min(m, n)
    k_e, k_p = math.ceil(0.01 * r), math.ceil(0.01 * r)
    k_z = math.ceil(0.1 * w.size)
    near = np.abs(w) <= np.partition(np.abs(w).ravel(), k_z - 1)[k_z - 1]
    total = float(np.sum(d * d))
    if total == 0:
        return {"rank_fraction": None, "near_zero_fraction_of_entries": near.mean()}
    s = np.linalg.svd(d, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    u, _, vh = np.linalg.svd(w, full_matrices=False)
    uk, vk = u[:, :k_p], vh[:k_p].T
    changed = np.abs(d) > threshold
    return {
        "rank": int(np.sum(s > s[0] * max(m, n) * np.finfo(np.float32).eps)),
        "rank_fraction": int(np.sum(s > s[0] * max(m, n) * np.finfo(np.float32).eps)) / r,
        "effective_rank": float(np.exp(-np.sum(p * np.log(p)))),
        "top_energy": float(np.sum(s[:k_e] ** 2) / np.sum(s**2)),
        "principal_left": float(np.sum((uk.T @ d) ** 2)) / total,
        "principal_right": float(np.sum((d @ vk) ** 2)) / total,
        "principal_both": float(np.sum((uk.T @ d @ vk) ** 2)) / total,
        "near_zero_energy": float(np.sum(d[near] ** 2)) / total,
        "near_zero_changed": float(np.sum(changed & near)) / max(1, int(changed.sum())),
        "near_zero_fraction_of_entries": float(near.mean()),
    }


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "opd_cli.main", "analyze-update", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_geometry_and_mask_match_direct_computation(edited, tmp_path):
    before_dir, after_dir, before, after = edited
    mask_path = tmp_path / "mask.safetensors"
    r = run_cli(before_dir, after_dir, "--geometry", "--mask", mask_path, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "update.json").read_text())
    rows = {row["name"]: row for row in report["geometry"]["matrices"]}
    assert set(rows) == {n for n, v in before.items() if v.ndim == 2}

    for name, row in rows.items():
        want = direct(before[name], after[name])
        assert row["near_zero_fraction_of_entries"] == pytest.approx(
            want["near_zero_fraction_of_entries"], abs=1e-12
        )
        if want["rank_fraction"] is None:
            assert name not in EDITED and row["rank_fraction"] is None and row["top_energy"] is None
            continue
        assert row["rank"] == want["rank"], name
        for key in ("rank_fraction", "top_energy", "principal_left", "principal_right", "principal_both"):
            assert row[key] == pytest.approx(want[key], abs=1e-9), (name, key)
        for key in ("near_zero_energy", "near_zero_changed"):
            assert row[key] == pytest.approx(want[key], abs=1e-12), (name, key)
        assert row["effective_rank"] == pytest.approx(want["effective_rank"], rel=1e-9), name

    # The known edits, independently of the numpy mirror above.
    assert rows[Q0]["rank"] == 2  # two outer products
    assert 1.0 < rows[Q0]["effective_rank"] < 2.0
    assert rows[UP1]["rank"] == 2 and rows[UP1]["principal_both"] == pytest.approx(1.0, abs=1e-5)
    assert rows[DOWN2]["near_zero_energy"] == pytest.approx(1.0, abs=1e-12)
    assert rows[DOWN2]["near_zero_changed"] == 1.0
    # ΔW = 0.01·W up to float32 rounding: the update's top energy is W's own
    s = np.linalg.svd(before[O3].astype(np.float64), compute_uv=False)
    assert rows[O3]["top_energy"] == pytest.approx(float(np.sum(s[:2] ** 2) / np.sum(s**2)), abs=1e-4)
    assert rows[O3]["principal_both"] == pytest.approx(rows[O3]["top_energy"], abs=1e-4)
    by_type = {g["type"]: g for g in report["geometry"]["by_type"]}
    assert by_type["mlp"]["matrices"] == 3 * 4 and by_type["attention"]["matrices"] == 4 * 4
    assert "update geometry" in r.stdout and "near-zero energy" in r.stdout

    # The mask: True exactly where |after - before| > 1e-5, for every tensor compared.
    with safe_open(mask_path, framework="pt") as handle:
        assert handle.metadata()["format"] == "opd-update-mask-v1"
        names = set(handle.keys())
        assert names == {p["name"] for p in report["parameters"]}
        for name in names:
            want = np.abs(after[name].astype(np.float32) - before[name]) > 1e-5
            np.testing.assert_array_equal(handle.get_tensor(name).numpy(), want, err_msg=name)
    changed = sum(p["numel"] - p["unchanged"] for p in report["parameters"])
    assert report["mask"]["changed"] == changed
    assert report["mask"]["fraction_changed"] == pytest.approx(1 - report["total"]["fraction_unchanged"])
