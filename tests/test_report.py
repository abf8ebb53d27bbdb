"""`opd report`: a PNG and a summary with the before → after eval KL from a synthetic metrics file."""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys

import pytest

from opd_student.tools.report import register, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def write_synthetic_run(run_dir, steps: int = 20) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        {"step": 0, "eval": True, "eval/reverse_kl": 2.0, "eval/topk_forward_kl": 1.6, "timestamp": 1000.0}
    ]
    for step in range(1, steps + 1):
        lines.append(
            {
                "step": step,
                "loss": 1.5 - 0.05 * step,
                "kl/sampled_reverse": 2.0 - 0.06 * step,
                "kl/topk_forward": 1.6 - 0.04 * step,
                "tokens_per_s": 300.0 + step,
                "time/step_s": 2.5,
                "timestamp": 1000.0 + 3 * step,
            }
        )
        if step == 10:
            lines.append({"step": 10, "eval": True, "eval/reverse_kl": 1.2, "eval/topk_forward_kl": 1.0})
    lines.append(
        {
            "step": steps,
            "eval": True,
            "eval/reverse_kl": 1.4,
            "eval/topk_forward_kl": 0.8,
            "eval/tokens": 1500,
            "eval/prompts": 32,
        }
    )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_report_writes_png_and_summary(tmp_path):
    write_synthetic_run(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"loss": "reverse_kl", "steps": 20}))
    png_path, md_path = write_report(tmp_path)
    assert png_path == tmp_path / "report.png"
    width, height = png_size(png_path)
    assert (width, height) == (1200, 800)
    assert png_path.stat().st_size > 30_000  # four panels of lines and text, not a blank image

    summary = md_path.read_text()
    assert "KL to teacher (eval/reverse_kl): 2.0000 → 1.4000 nats/token (-30.0 %, step 0 → 20)" in summary
    assert "| eval/reverse_kl | 2.0000 (step 0) | 1.4000 (step 20) | -30.0 % | 1.2000 (10) |" in summary
    assert "| eval/topk_forward_kl | 1.6000 (step 0) | 0.8000 (step 20) | -50.0 % | 0.8000 (20) |" in summary
    assert "32 prompts, 1500 scored tokens." in summary
    assert "| eval/tokens" not in summary  # counts are not metrics to compare before/after
    assert "| steps | 20 logged, steps 1–20 |" in summary
    assert "| loss | first 1.45, last 0.5 |" in summary
    assert "| wall time | 1 min 0 s (first to last record) |" in summary
    assert "| time in train steps | 50.0 s |" in summary
    assert '"loss": "reverse_kl"' in summary and "## Config (config.json)" in summary


def test_report_survives_missing_keys(tmp_path):
    """Only a loss and phase times, no eval, no tokens/s: still a valid PNG and a summary without eval rows."""
    lines = [{"step": s, "loss": 1.0 / s, "time/sample_s": 2.0, "time/score_s": 0.5} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "config.toml").write_text('loss = "jsd"\n')
    png_path, md_path = write_report(tmp_path)
    assert png_size(png_path) == (1200, 800)
    summary = md_path.read_text()
    assert "Held-out eval" not in summary and "KL to teacher" not in summary
    assert "| loss | first 1, last 0.2 |" in summary
    assert "| time in train steps | 12.5 s (sum of time/sample_s, time/score_s) |" in summary
    assert '```toml\nloss = "jsd"\n```' in summary


def test_report_errors_on_empty_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no records"):
        write_report(tmp_path)


def test_report_subcommand(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="opd")
    register(parser.add_subparsers())
    write_synthetic_run(tmp_path / "run")
    args = parser.parse_args(["report", str(tmp_path / "run")])
    args.func(args)
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'run' / 'report.png'}" in out and "2.0000 → 1.4000" in out
    with pytest.raises(SystemExit, match="opd report: .*does not exist"):
        args = parser.parse_args(["report", str(tmp_path / "nothing")])
        args.func(args)


def test_opd_report_command_line(tmp_path):
    write_synthetic_run(tmp_path / "run")
    r = subprocess.run(
        [sys.executable, "-m", "opd_cli.main", "report", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "invalid choice: 'report'" in r.stderr:
        pytest.skip("report is not registered in opd_student/cli.py yet (the lead adds it)")
    assert r.returncode == 0, r.stderr
    assert "report.png" in r.stdout and "2.0000 → 1.4000" in r.stdout
