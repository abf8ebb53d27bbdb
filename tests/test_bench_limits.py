"""`opd bench limits`: the JSON it writes, and ceilings that are exactly the arithmetic on its own measured
figures (no timing thresholds: the figures themselves depend on the machine and its load)."""

from __future__ import annotations

import argparse
import json

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from opd_bench.limits import main, model_size, register, student_config
from opd_common.embedded import embedded_teacher_dir

ROWS, BATCH, CONTEXT = (1, 16), 8, 64


@pytest.fixture(scope="module")
def limits_result(tmp_path_factory, tiny_model_dir) -> dict:
    out = tmp_path_factory.mktemp("limits") / "limits.json"
    parser = argparse.ArgumentParser(prog="opd bench")
    register(parser.add_subparsers(dest="bench", required=True))
    args = parser.parse_args(
        ["limits", "--model", str(tiny_model_dir), "--student-layers", "2", "--device", "cpu",
         "--bandwidth-mib", "4", "--rows", ",".join(map(str, ROWS)), "--repeats", "2",
         "--min-seconds", "0.001", "--decode-batch", str(BATCH), "--context", str(CONTEXT),
         "--json-out", str(out)]
    )  # fmt: skip
    assert args.func is main
    assert args.func(args) == 0
    return json.loads(out.read_text())


def test_json_holds_every_measured_figure(limits_result):
    r = limits_result
    assert {"config", "device", "bandwidth", "matmul", "teacher", "student", "decode_ceiling",
            "scoring_ceiling"} <= set(r)  # fmt: skip
    assert r["device"]["device"] == "cpu" and r["device"]["name"]
    bw = r["bandwidth"]
    assert bw["buffer_bytes"] == 4 << 20
    assert bw["copy_gb_s"] > 0 and bw["read_gb_s"] > 0
    assert set(bw["read_gb_s_at_student_weights"]) == {"float32", "bfloat16"}
    # every dtype × shape × row count (the decode batch is always among the rows)
    cells = {(m["dtype"], m["shape"], m["rows"]) for m in r["matmul"]}
    assert len(cells) == len(r["matmul"]) == 2 * 3 * len({*ROWS, BATCH})
    assert all(m["gflop_s"] > 0 for m in r["matmul"])
    head = [m for m in r["matmul"] if m["shape"] == "head D→V"][0]
    assert (head["in"], head["out"]) == (128, 49152)  # the tiny model: D = 128, the real vocabulary


def test_sizes_count_every_parameter_once(limits_result, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    teacher, student = limits_result["teacher"], limits_result["student"]
    assert teacher["params"] == sum(p.numel() for p in model.parameters())
    assert teacher["tied_embedding"] and teacher["matmul_params"] == teacher["params"]
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert teacher["params"] - student["params"] == (teacher["layers"] - student["layers"]) * per_layer
    assert teacher["head_params"] == 49152 * 128


def test_default_student_and_teacher_sizes():
    """The figures docs/benchmarks.md states: 99.1M (20 layers) and 134.5M (30) parameters, tied head."""
    config = AutoConfig.from_pretrained(embedded_teacher_dir())
    teacher, student = model_size(config), model_size(student_config(config, 20))
    assert round(teacher["params"] / 1e5) == 1345 and round(student["params"] / 1e5) == 991
    assert student["tied_embedding"] and student["matmul_params"] == student["params"]
    assert student["d_attn"] == 576 and student["head_params"] == 49152 * 576


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_ceiling_is_bandwidth_over_weight_bytes(limits_result, dtype):
    r = limits_result
    c, params = r["decode_ceiling"][dtype], r["student"]["matmul_params"]
    assert c["bytes_per_step"] == params * {"float32": 4, "bfloat16": 2}[dtype]
    assert c["read_gb_s"] == r["bandwidth"]["read_gb_s_at_student_weights"][dtype]
    assert c["max_steps_per_s"] == pytest.approx(c["read_gb_s"] * 1e9 / c["bytes_per_step"], rel=1e-12)
    assert c["batch"] == BATCH
    assert c["bandwidth_tokens_per_s"] == pytest.approx(BATCH * c["max_steps_per_s"], rel=1e-12)
    best_at_batch = max(m["gflop_s"] for m in r["matmul"] if m["dtype"] == dtype and m["rows"] == BATCH)
    assert c["compute_tokens_per_s"] == pytest.approx(best_at_batch * 1e9 / (2 * params), rel=1e-12)
    assert c["max_tokens_per_s"] == min(c["bandwidth_tokens_per_s"], c["compute_tokens_per_s"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scoring_ceiling_is_matmul_throughput_over_flops_per_token(limits_result, dtype):
    r = limits_result
    c, t = r["scoring_ceiling"][dtype], r["teacher"]
    assert c["flops_per_token"] == 2 * t["matmul_params"] + 2 * t["layers"] * CONTEXT * t["d_attn"]
    assert c["flops_per_token_hidden"] == c["flops_per_token"] - 2 * t["head_params"]
    best = max(m["gflop_s"] for m in r["matmul"] if m["dtype"] == dtype and m["rows"] == max(ROWS))
    assert c["gflop_s"] == best
    assert c["max_tokens_per_s"] == pytest.approx(best * 1e9 / c["flops_per_token"], rel=1e-12)
    assert c["max_tokens_per_s_hidden"] == pytest.approx(best * 1e9 / c["flops_per_token_hidden"], rel=1e-12)
