"""metrics.jsonl: durable appends, a half-written last line is cut off, truncate_after trims to a checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from opd_student.metrics_log import MetricsLog, drop_partial_last_line, read_metrics


def test_log_and_read_back(tmp_path):
    with MetricsLog(tmp_path, tensorboard=False) as log:
        log.log({"step": 1, "loss": 0.5, "kl/sampled_reverse": np.float32(1.25)})
        log.log({"step": 1, "eval": True, "eval/reverse_kl": 2.0, "timestamp": 123.0})
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 1]
    assert records[0]["kl/sampled_reverse"] == 1.25
    assert isinstance(records[0]["timestamp"], float)
    assert records[1]["timestamp"] == 123.0
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2


def test_partial_last_line_is_dropped_on_open(tmp_path):
    with MetricsLog(tmp_path, tensorboard=False) as log:
        for step in range(1, 4):
            log.log({"step": step, "loss": float(step)})
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')  # a kill in the middle of a write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]  # readers skip it too

    with MetricsLog(tmp_path, tensorboard=False) as log:
        log.log({"step": 4, "loss": 4.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_drop_partial_line_long_file_and_edge_cases(tmp_path):
    path = tmp_path / "m.jsonl"
    drop_partial_last_line(path)  # missing file: nothing to do
    assert not path.exists()
    path.write_text("x" * 10_000)  # one partial line longer than the scan block
    drop_partial_last_line(path)
    assert path.read_bytes() == b""
    body = "".join(json.dumps({"step": i, "pad": "y" * 100}) + "\n" for i in range(200))
    path.write_text(body + "z" * 5000)
    drop_partial_last_line(path)
    assert path.read_text() == body


def test_truncate_after_drops_later_steps(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.log({"run": "header"})  # no step: kept
    for step in range(1, 8):
        log.log({"step": step, "loss": 1.0 / step})
        if step % 3 == 0:
            log.log({"step": step, "eval": True, "eval/reverse_kl": 2.0 / step})
    assert log.truncate_after(4) == 4  # steps 5, 6, 7 and the eval at 6
    log.log({"step": 5, "loss": 0.2})  # the resumed run goes on appending
    log.close()
    records = read_metrics(tmp_path)
    train_steps = [r["step"] for r in records if "step" in r and not r.get("eval")]
    assert train_steps == [1, 2, 3, 4, 5]
    assert [r["step"] for r in records if r.get("eval")] == [3]
    assert records[0] == {"run": "header", "timestamp": records[0]["timestamp"]}
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_read_metrics_names_a_corrupt_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not valid JSON"):
        read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="run directory"):
        read_metrics(tmp_path / "nope")


WRITER = """
import sys
from opd_student.metrics_log import MetricsLog
log = MetricsLog(sys.argv[1], tensorboard=False)
step = 0
while True:
    step += 1
    log.log({"step": step, "loss": 1.0 / step, "pad": "p" * 2000})
"""


def test_sigkill_mid_write_then_resume_has_no_gap_or_repeat(tmp_path):
    """A real writer process killed at an arbitrary moment; the reopened log continues cleanly."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)])
    path = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not path.exists() or path.stat().st_size < 50_000):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert path.stat().st_size >= 50_000, "writer did not get going"

    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == list(range(1, len(steps) + 1))
    checkpoint = len(steps) // 2
    with MetricsLog(tmp_path, tensorboard=False) as log:
        log.truncate_after(checkpoint)
        for step in range(checkpoint + 1, checkpoint + 11):
            log.log({"step": step, "loss": 1.0 / step})
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == list(range(1, checkpoint + 11))
    assert path.read_text().endswith("\n")
