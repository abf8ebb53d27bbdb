"""`opd bench gpu` (scripts/gpu_check.sh): the accelerator check runs end to end on this CPU with the tiny
sizes, so it cannot rot before a GPU machine runs it. Structure and signs only: no timing thresholds."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_bench.check_parts import CheckRun
from opd_bench.gpu_models import MODELS, SIZES

REPO = Path(__file__).resolve().parents[1]
CLIENTS, SIGNALS, TRANSPORTS = (1, 8, 32), ("topk", "hidden"), ("http", "grpc")


@pytest.fixture(scope="module")
def check(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    tmp = tmp_path_factory.mktemp("gpu-check")
    out = tmp / "gpu_check.json"
    env = {**os.environ, "OPD": str(Path(sys.executable).with_name("opd"))}
    cmd = [str(REPO / "scripts" / "gpu_check.sh"), "--sizes", "tiny", "--device", "cpu", "--seq-len", "16",
           "--prompt-len", "8", "--requests-per-client", "1", "--train-max-new-tokens", "8",
           "--workdir", str(tmp / "work"), "--out", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return r, json.loads(out.read_text())


def test_every_part_ran_and_the_json_says_on_what(check):
    r, result = check
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    teachers, student = SIZES["tiny"]["teachers"], SIZES["tiny"]["student"]
    expected = [f"build/{teachers[0]}", f"start/{teachers[0]}", f"serve/{teachers[0]}", "build/student",
                "train_step", f"build/{teachers[1]}", f"start/{teachers[1]}", f"serve/{teachers[1]}"]  # fmt: skip
    assert [p["name"] for p in result["parts"]] == expected
    assert all(p["status"] == "ok" for p in result["parts"]), [
        p for p in result["parts"] if p["status"] != "ok"
    ]
    assert result["summary"]["parts"] == dict.fromkeys(expected, "ok")
    assert result["sizes"] == "tiny" and result["device"]["device"] == "cpu" and result["device"]["name"]
    assert result["config"]["dtype"] == "bfloat16"
    built = {p["name"]: p["result"] for p in result["parts"] if p["name"].startswith("build/")}
    assert built["build/student"]["model"] == student
    for name in teachers:
        assert built[f"build/{name}"]["params"] == _params(name)
        assert built[f"build/{name}"]["dtype"] == "bfloat16"


def test_service_and_raw_ran_at_every_client_count_and_signal(check):
    _, result = check
    for name in SIZES["tiny"]["teachers"]:
        serve = next(p["result"] for p in result["parts"] if p["name"] == f"serve/{name}")
        assert serve["dtype"] == "bfloat16" and serve["vocab_size"] == MODELS[name]().vocab_size
        runs = serve["runs"]
        assert len(runs) == len(CLIENTS) * len(SIGNALS) * (1 + len(TRANSPORTS))
        for clients in CLIENTS:
            for signal in SIGNALS:
                rows = {r["transport"]: r for r in runs if r["clients"] == clients and r["signal"] == signal}
                assert set(rows) == {"raw", *TRANSPORTS}
                assert rows["raw"]["requests"] == max(8, clients)  # serve.py's min_requests
                assert rows["raw"]["scored_tokens_per_s"] > 0
                for transport in TRANSPORTS:
                    ratio = rows[transport]["service_over_raw"]
                    assert isinstance(ratio, float) and math.isfinite(ratio) and ratio > 0, rows[transport]
    summary = result["summary"]["serve"]
    assert len(summary) == len(SIZES["tiny"]["teachers"]) * len(CLIENTS) * len(SIGNALS) * len(TRANSPORTS)
    assert all(r["service_over_raw"] > 0 for r in summary)


def test_one_trainer_step_against_the_service(check):
    _, result = check
    step = result["summary"]["train_step"]
    assert step["tokens"] > 0 and step["tokens_per_s"] > 0 and step["mem/peak_mib"] > 0
    assert all(step[k] > 0 for k in ("time/sample_s", "time/score_wait_s", "time/train_s"))
    train = next(p["result"] for p in result["parts"] if p["name"] == "train_step")
    assert train["step"]["step"] == 1 and train["evals"] == 2  # before the first step and after the last


def test_real_sizes_are_the_models_they_are_named_after():
    """Parameter counts of the published models (tied heads for Qwen3, untied for Llama 3)."""
    assert round(_params("qwen3-0.6b") / 1e7) == 60
    assert round(_params("qwen3-1.7b") / 1e7) == 172
    assert round(_params("llama-3-8b") / 1e7) == 803


def test_parts_skip_on_a_failed_need_and_on_a_spent_budget(tmp_path):
    out = tmp_path / "check.json"
    run = CheckRun(out, {"device": "x"}, budget_s=3600, min_part_s=0)
    assert run.run("good", lambda: {"n": 1}) == {"n": 1}
    assert run.run("bad", lambda: {"n": 1 // 0}) is None
    assert run.run("after-bad", lambda: {}, needs=("bad",)) is None
    assert run.run("after-good", lambda: {"m": 2}, needs=("good",)) == {"m": 2}
    run.deadline = 0.0  # the budget is spent: nothing more starts
    assert run.run("late", lambda: {}) is None
    parts = {p["name"]: p for p in json.loads(out.read_text())["parts"]}  # written after every part
    assert [p["status"] for p in parts.values()] == ["ok", "failed", "skipped", "ok", "skipped"]
    assert "ZeroDivisionError" in parts["bad"]["error"]
    assert parts["after-bad"]["reason"] == "needs bad"
    assert parts["late"]["reason"].startswith("time budget spent")
    assert parts["good"]["result"] == {"n": 1}


def _params(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(MODELS[name]()).parameters())
