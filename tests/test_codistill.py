"""Co-distillation (OPCoD): cognizance gating on hand-made scores, a push to another service than the
teacher (student_push_url), and `opd codistill` end to end with two tiny students."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import make_tiny_model, start_teacher
from opd_client import HttpTeacherClient
from opd_client.scores import SequenceScores
from opd_student.config import TrainConfig
from opd_student.methods.cognizance import cognizance_keep, teacher_entropy, teacher_margin
from opd_student.methods.step_weights import StepWeights
from opd_student.methods.token_mask import TokenMaskRule
from opd_student.metrics_log import read_metrics
from opd_student.rollouts import Rollout

FAST = [
    "--prompts-per-step", "2",
    "--samples-per-prompt", "2",
    "--max-new-tokens", "8",
    "--top-k", "8",
    "--eval-num-prompts", "2",
    "--eval-max-new-tokens", "4",
    "--lr", "1e-3",
    "--steps", "2",
    "--save-every", "0",
]  # fmt: skip


def scores(probs_T_K: list[list[float]]) -> SequenceScores:
    """Scores whose top-k probabilities are given; the rest of the mass is the tail."""
    p = np.array(probs_T_K, dtype=np.float64)
    tail = np.log(np.clip(1 - p.sum(1), 1e-30, None))
    lp = np.log(p).astype(np.float32)
    return SequenceScores(lp[:, 0], np.zeros(p.shape, np.int32), lp, tail.astype(np.float32))


# ---- the gate on hand-made numbers ----------------------------------------------------------------------


def test_entropy_and_margin_of_the_teachers_top_k():
    s = scores([[0.9, 0.05], [0.4, 0.4]])  # tails 0.05 and 0.2
    h = [-(0.9 * math.log(0.9) + 2 * 0.05 * math.log(0.05)), -(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2))]
    assert teacher_entropy(s).tolist() == pytest.approx(h, abs=1e-5)
    assert teacher_margin(s).tolist() == pytest.approx([0.85, 0.0], abs=1e-6)
    assert cognizance_keep(s, "entropy", 0.5).tolist() == [1.0, 0.0]
    assert cognizance_keep(s, "margin", 0.5).tolist() == [1.0, 0.0]


def test_the_gate_weights_the_step_and_reports_its_share():
    cfg = SimpleNamespace(
        cognizance_gate="margin", cognizance_threshold=0.5, fire_opd=False, ta_opd=False, fire_reweight=False
    )
    rollouts = [Rollout([1], [5, 6]), Rollout([1], [7])]
    step = [scores([[0.9, 0.05], [0.4, 0.4]]), scores([[0.6, 0.05]])]
    weights = StepWeights(cfg, rollouts, step, None, TokenMaskRule())
    w_B_T = weights.micro_batch([0, 1], torch.zeros(2, 2, 3), None, torch.ones(2, 2))
    assert w_B_T.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert weights.metrics()["select/cognizant"] == 2 / 3


# ---- pushes to the service a peer trains against -------------------------------------------------------


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    root = tmp_path_factory.mktemp("codistill-students")
    return make_tiny_model(root / "a", layers=2, seed=1), make_tiny_model(root / "b", layers=2, seed=2)


def version(service) -> int:
    with HttpTeacherClient(service.http_url, api_key=service.api_key) as client:
        return client.models()[0].weights_version


def test_student_push_url_sends_the_weights_to_another_service(students, tmp_path, monkeypatch):
    """Trainer A trains against service B and pushes to service A: B keeps its weights, A gets two pushes."""
    from opd_student.train import train

    a, b = students
    key = "test-key"
    service_a = start_teacher(tmp_path / "sa", [f"a={a}"], key, extra_args=["--weight-updates"])
    service_b = start_teacher(tmp_path / "sb", [f"b={b}"], key, extra_args=["--weight-updates"])
    monkeypatch.setenv("OPD_TEACHER_API_KEY", key)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        cfg = TrainConfig(
            student=str(a),
            teacher_url=service_b.http_url,
            student_push_url=service_a.http_url,
            teacher_follows_student=1,
            cognizance_gate="entropy",
            cognizance_threshold=100.0,  # keeps every token: the gate runs, the loss is unchanged
            out=str(tmp_path / "run"),
            prompts_per_step=2,
            samples_per_prompt=2,
            max_new_tokens=8,
            top_k=8,
            eval_num_prompts=2,
            eval_max_new_tokens=4,
            steps=2,
            save_every=0,
        )
        train(cfg)
        assert (version(service_a), version(service_b)) == (2, 0)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        service_a.stop()
        service_b.stop()
    records = [r for r in read_metrics(tmp_path / "run") if not r.get("eval")]
    assert [r["teacher/pushed_version"] for r in records] == [1, 2]
    assert [r["teacher/weights_version_max"] for r in records] == [0, 0]  # its teacher, B, never moved
    assert all(r["select/cognizant"] == 1.0 for r in records)


# ---- opd codistill ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_codistill_runs_both_sides(students, tmp_path):
    """Two services, two trainers at once; each pushes to its own service after every step, and each
    trains against the other's: both runs finish with two pushes and final weights."""
    a, b = students
    out = tmp_path / "co"
    cmd = [sys.executable, "-m", "opd_cli.main", "codistill", "--a", str(a), "--b", str(b), "--out", str(out)]
    cmd += ["--device", "cpu", "--", *FAST, "--cognizance-gate", "margin", "--cognizance-threshold", "0.0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (
        r.stdout[-3000:] + r.stderr[-3000:] + (out / "trainer-a.log").read_text()[-3000:]
    )
    for side in ("a", "b"):
        records = [x for x in read_metrics(out / side) if not x.get("eval")]
        assert [x["teacher/pushed_version"] for x in records] == [1, 2]
        assert all(0 <= x["teacher/weights_version_max"] <= 2 for x in records)  # the peer's pushes
        assert (out / side / "final" / "config.json").exists()
    assert "trainer a: exit 0" in r.stdout and "trainer b: exit 0" in r.stdout
