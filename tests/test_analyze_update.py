"""`opd analyze-update`: every reported number against a direct numpy computation on a tiny model.

AFTER is the tiny model with known edits: 37 entries of layer 1's q_proj moved by +1e-3, layer 2's MLP
scaled by 1.01, 5 entries of the final norm moved by +2e-5, layer 3's o_proj stored as float16 and layer 0's
v_proj as bfloat16 (rounding), and one extra tensor; everything else identical.
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
from safetensors.numpy import load_file
from safetensors.torch import save_file

from opd_student.tools.update_analysis import UpdateError, analyze

Q1 = "model.layers.1.self_attn.q_proj.weight"
MLP2 = [f"model.layers.2.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
O3 = "model.layers.3.self_attn.o_proj.weight"
V0 = "model.layers.0.self_attn.v_proj.weight"
FINAL_NORM = "model.norm.weight"
# Written out by hand rather than imported, so the test does not share the code's classification.
TYPE_OF_MODULE = {
    **dict.fromkeys(["q_proj", "k_proj", "v_proj", "o_proj"], "attention"),
    **dict.fromkeys(["gate_proj", "up_proj", "down_proj"], "mlp"),
    **dict.fromkeys(["input_layernorm", "post_attention_layernorm", "norm"], "norm"),
    "embed_tokens": "embedding",
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def edited(tmp_path_factory, tiny_model_dir):
    """(before dir, after dir, {name: before fp32}, {name: after as fp32}) for the edits above."""
    before = load_file(tiny_model_dir / "model.safetensors")
    after_fp32 = {n: v.copy() for n, v in before.items()}
    stored = {n: torch.from_numpy(v.copy()) for n, v in before.items()}

    rng = np.random.default_rng(0)
    idx = rng.choice(before[Q1].size, size=37, replace=False)
    after_fp32[Q1].flat[idx] += np.float32(1e-3)
    for name in MLP2:
        after_fp32[name] = before[name] * np.float32(1.01)
    after_fp32[FINAL_NORM][:5] += np.float32(2e-5)
    after_fp32[O3] = before[O3].astype(np.float16).astype(np.float32)
    for name in [Q1, *MLP2, FINAL_NORM]:
        stored[name] = torch.from_numpy(after_fp32[name])
    stored[O3] = torch.from_numpy(before[O3].astype(np.float16))
    stored[V0] = torch.from_numpy(before[V0]).to(torch.bfloat16)
    after_fp32[V0] = stored[V0].float().numpy()
    stored["extra.bias"] = torch.zeros(3)

    after_dir = tmp_path_factory.mktemp("after")
    save_file(stored, after_dir / "model.safetensors")
    shutil.copy(tiny_model_dir / "config.json", after_dir / "config.json")
    return tiny_model_dir, after_dir, before, after_fp32


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "opd_cli.main", "analyze-update", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def direct(before: dict, after: dict, threshold: float) -> dict:
    """The expected report, from numpy: per tensor and pooled by type, layer, layer × type and module."""
    per_name, groups = {}, {}
    for name, b in before.items():
        d = after[name] - b  # float32, as the tool compares
        s = {
            "tensors": 1,
            "numel": d.size,
            "unchanged": int(np.sum(np.abs(d) <= threshold)),
            "delta_sq": float(np.sum(d.astype(np.float64) ** 2)),
            "before_sq": float(np.sum(b.astype(np.float64) ** 2)),
            "max_abs_delta": float(np.abs(d).max()),
        }
        per_name[name] = s
        parts = name.split(".")
        layer = parts[2] if parts[1] == "layers" else "-"
        kind = TYPE_OF_MODULE[parts[-2]]
        for key in [
            ("type", kind),
            ("layer", layer),
            ("cell", layer, kind),
            ("module", parts[-2]),
            ("total",),
        ]:
            g = groups.setdefault(key, dict.fromkeys(s, 0))
            for k in s:
                g[k] = max(g[k], s[k]) if k == "max_abs_delta" else g[k] + s[k]
    return {"params": per_name, "groups": groups}


def assert_stats(got: dict, want: dict, what: str) -> None:
    for key in ("tensors", "numel", "unchanged"):
        assert got[key] == want[key], (what, key, got[key], want[key])
    assert got["fraction_unchanged"] == want["unchanged"] / want["numel"], what
    assert got["max_abs_delta"] == want["max_abs_delta"], what
    delta_norm, before_norm = math.sqrt(want["delta_sq"]), math.sqrt(want["before_sq"])
    assert abs(got["delta_norm"] - delta_norm) <= 1e-6, (what, got["delta_norm"], delta_norm)
    assert abs(got["before_norm"] - before_norm) <= 1e-6, (what, got["before_norm"], before_norm)
    assert abs(got["relative_update_norm"] - delta_norm / before_norm) <= 1e-6, what


def assert_report(report: dict, expected: dict) -> None:
    params, groups = expected["params"], expected["groups"]
    assert {p["name"] for p in report["parameters"]} == set(params)
    for p in report["parameters"]:
        assert_stats(p, params[p["name"]], p["name"])
    assert_stats(report["total"], groups[("total",)], "total")
    for key, rows, label in [
        ("type", report["by_type"], lambda r: ("type", r["type"])),
        ("layer", report["by_layer"], lambda r: ("layer", r["layer"])),
        ("cell", report["by_layer_type"], lambda r: ("cell", r["layer"], r["type"])),
        ("module", report["by_module"], lambda r: ("module", r["module"])),
    ]:
        assert {label(r) for r in rows} == {k for k in groups if k[0] == key}, key
        for r in rows:
            assert_stats(r, groups[label(r)], str(label(r)))


def test_numbers_match_direct_computation(edited, tmp_path):
    before_dir, after_dir, before, after = edited
    r = run_cli(before_dir, after_dir, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "update.json").read_text())
    assert report["threshold"] == 1e-5
    assert report["only_in_after"] == ["extra.bias"] and report["only_in_before"] == []
    assert_report(report, direct(before, after, 1e-5))

    # The known edits, independently of the numpy mirror above.
    by_name = {p["name"]: p for p in report["parameters"]}
    assert by_name[Q1]["numel"] - by_name[Q1]["unchanged"] == 37
    assert by_name[FINAL_NORM]["numel"] - by_name[FINAL_NORM]["unchanged"] == 5
    for name in MLP2:
        assert abs(by_name[name]["relative_update_norm"] - 0.01) <= 1e-6
    assert by_name[V0]["dtype_after"] == "BF16" and by_name[O3]["dtype_after"] == "F16"
    assert by_name[V0]["unchanged"] < by_name[V0]["numel"]  # bf16 rounding moves most entries > 1e-5
    untouched = set(by_name) - {Q1, *MLP2, FINAL_NORM, O3, V0}
    assert untouched and all(by_name[n]["unchanged"] == by_name[n]["numel"] for n in untouched)
    assert all(by_name[n]["delta_norm"] == 0.0 for n in untouched)

    # The printed table and the markdown carry the same numbers; the heatmap is a PNG.
    attention = next(g for g in report["by_type"] if g["type"] == "attention")
    row = next(line.split() for line in r.stdout.splitlines() if line.startswith("attention "))
    assert row[1:5] == [
        str(attention["tensors"]),
        str(attention["numel"]),
        str(attention["unchanged"]),
        f"{attention['fraction_unchanged']:.4f}",
    ]
    assert f"{attention['relative_update_norm']:.3e}" in row
    md = (tmp_path / "out" / "update.md").read_text()
    assert f"| attention | {attention['tensors']} | {attention['numel']} | {attention['unchanged']} |" in md
    assert (tmp_path / "out" / "update_heatmap.png").read_bytes()[:8] == PNG_SIGNATURE


def test_threshold_flag_and_checkpoint_input(edited, tmp_path):
    """--threshold 2e-3 on a trainer checkpoint (step-NNNNNN/trainable.safetensors) as AFTER."""
    before_dir, after_dir, before, after = edited
    step = tmp_path / "run" / "checkpoints" / "step-000003"
    step.mkdir(parents=True)
    shutil.copy(after_dir / "model.safetensors", step / "trainable.safetensors")
    r = run_cli(before_dir, step, "--threshold", "2e-3", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "update.json").read_text())
    assert report["threshold"] == 2e-3
    assert_report(report, direct(before, after, 2e-3))
    by_name = {p["name"]: p for p in report["parameters"]}
    assert by_name[Q1]["unchanged"] == by_name[Q1]["numel"]  # +1e-3 is within 2e-3
    assert by_name[FINAL_NORM]["unchanged"] == by_name[FINAL_NORM]["numel"]

    # Threshold 0: only bit-identical entries count (the bound is inclusive), in-process for speed.
    exact = analyze(before_dir, after_dir, threshold=0.0)
    assert_report(exact, direct(before, after, 0.0))
    assert exact["total"]["unchanged"] > 0


def test_chunked_reads_match_whole_tensors(edited, tmp_path, monkeypatch):
    """Tiny chunks (partial last chunk, 1-row chunks of wide tensors) and a 0-d tensor give the same numbers."""
    from opd_student.tools import update_analysis

    before_dir, after_dir, before, after = edited
    monkeypatch.setattr(update_analysis, "CHUNK_ENTRIES", 1000)
    assert_report(analyze(before_dir, after_dir), direct(before, after, 1e-5))

    b, a = {"s": np.float32(2.0), "m": before[Q1][:7, :3]}, {"s": np.float32(2.5), "m": after[Q1][:7, :3] + 1}
    for side, values in (("b", b), ("a", a)):
        (tmp_path / side).mkdir()
        save_file({n: torch.tensor(v) for n, v in values.items()}, tmp_path / side / "model.safetensors")
    report = analyze(tmp_path / "b", tmp_path / "a")
    scalar = next(p for p in report["parameters"] if p["name"] == "s")
    assert scalar["shape"] == [] and scalar["unchanged"] == 0 and scalar["relative_update_norm"] == 0.25
    matrix = next(p for p in report["parameters"] if p["name"] == "m")
    assert matrix["numel"] == 21 and matrix["unchanged"] == 0


def test_shape_mismatch_names_the_parameter(edited, tmp_path):
    before_dir, _, before, _ = edited
    name = "model.layers.0.self_attn.k_proj.weight"
    bad = {n: torch.from_numpy(v) for n, v in before.items()}
    bad[name] = bad[name][:-1].contiguous()
    save_file(bad, tmp_path / "model.safetensors")
    r = run_cli(before_dir, tmp_path)
    assert r.returncode != 0
    shape = before[name].shape
    assert name in r.stderr and str(tuple(shape)) in r.stderr and str((shape[0] - 1, shape[1])) in r.stderr
    assert "Traceback" not in r.stderr


def test_unusable_inputs_are_refused_with_a_reason(edited, tmp_path):
    before_dir = edited[0]
    with pytest.raises(UpdateError, match="does not exist"):
        analyze(tmp_path / "missing", before_dir)

    other = tmp_path / "other"
    other.mkdir()
    save_file({"foo.weight": torch.zeros(2)}, other / "model.safetensors")
    with pytest.raises(UpdateError, match="share no tensor names.*foo.weight"):
        analyze(before_dir, other)

    lora = tmp_path / "run" / "checkpoints" / "step-000001"
    lora.mkdir(parents=True)
    adapter = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    save_file({adapter: torch.zeros(4, 128)}, lora / "trainable.safetensors")
    with pytest.raises(UpdateError, match="LoRA adapters only.*final/"):
        analyze(before_dir, lora)
    (tmp_path / "run" / "final").mkdir()
    with pytest.raises(UpdateError, match="run directory"):
        analyze(before_dir, tmp_path / "run")
    with pytest.raises(UpdateError, match="threshold"):
        analyze(before_dir, before_dir, threshold=-1.0)
