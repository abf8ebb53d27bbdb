"""`opd train` end to end against the real teacher service: every loss, GKD mixing, LoRA, resume after
SIGKILL, a teacher outage mid-run, and clear start-up errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from helpers import make_tiny_model, start_teacher
from opd_common.launch import free_port
from opd_student.metrics_log import read_metrics

FAST = [
    "--prompts-per-step",
    "2",
    "--samples-per-prompt",
    "2",
    "--max-new-tokens",
    "8",
    "--top-k",
    "8",
    "--eval-num-prompts",
    "4",
    "--eval-max-new-tokens",
    "8",
    "--teacher-model",
    "tiny",
    "--lr",
    "1e-3",
]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A second tiny random model (other seed) with the teacher's tokenizer: the student."""
    return make_tiny_model(tmp_path_factory.mktemp("student") / "tiny-student", layers=2, seed=1)


def run_train(
    teacher_url: str,
    api_key: str,
    student: Path,
    out: Path,
    *args: str,
    check: bool = True,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPD_TEACHER_API_KEY": api_key}
    cmd = train_cmd(teacher_url, student, out, *args)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def train_cmd(teacher_url: str, student: Path, out: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "opd_cli.main",
        "train",
        "--teacher-url",
        teacher_url,
        "--student",
        str(student),
        "--out",
        str(out),
        *FAST,
        *args,
    ]


def wait_for_step(out: Path, step: int, timeout: float = 240) -> None:
    """Until the run in `out` has logged training step `step` (bounded in time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and max(train_steps(out), default=0) >= step:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{out} did not reach step {step} in {timeout} s")


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if not r.get("eval")]


@pytest.mark.parametrize(
    "loss", ["reverse_kl", "topk_forward_kl", "student_topk_reverse_kl", "jsd", "exact_forward_kl"]
)
def test_each_loss_runs_end_to_end(teacher, student_dir, tmp_path, loss):
    run_train(
        teacher.http_url, teacher.api_key, student_dir, tmp_path / "run", "--loss", loss, "--steps", "2"
    )
    records = read_metrics(tmp_path / "run")
    train = [r for r in records if not r.get("eval")]
    evals = [r for r in records if r.get("eval")]
    assert [r["step"] for r in train] == [1, 2]
    assert [r["step"] for r in evals] == [0, 2]
    for r in train:
        assert all(
            isinstance(r[k], float) and r[k] == r[k] for k in ("loss", "kl/sampled_reverse", "tokens_per_s")
        )
        assert r["tokens"] > 0 and r["time/train_s"] > 0
    assert (tmp_path / "run" / "report.png").stat().st_size > 10_000
    assert "→" in (tmp_path / "run" / "summary.md").read_text()
    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")  # a plain HF directory


def test_topk_forward_kl_lowers_the_kl_on_a_fixed_budget(teacher, student_dir, tmp_path):
    """Distillation works: 12 steps at a high learning rate cut the tiny student's held-out KL."""
    run_train(
        teacher.http_url,
        teacher.api_key,
        student_dir,
        tmp_path / "run",
        "--loss",
        "topk_forward_kl",
        "--steps",
        "12",
        "--lr",
        "3e-3",
        "--eval-num-prompts",
        "8",
        "--save-every",
        "0",
    )
    evals = [r for r in read_metrics(tmp_path / "run") if r.get("eval")]
    before, after = evals[0]["eval/topk_forward_kl"], evals[-1]["eval/topk_forward_kl"]
    assert after < 0.8 * before, (before, after)


def test_gkd_mixing_and_lora_and_config_file(teacher, student_dir, tmp_path):
    dataset = tmp_path / "fixed.jsonl"
    dataset.write_text(
        "\n".join(
            json.dumps(
                {
                    "messages": [{"role": "user", "content": f"Count to {n}."}],
                    "completion": " ".join(str(i) for i in range(1, n + 1)),
                }
            )
            for n in range(2, 6)
        )
        + "\n"
    )
    config = tmp_path / "run.toml"
    config.write_text(
        f'loss = "jsd"\njsd_beta = 0.5\ngkd_lambda = 0.5\ndataset = "{dataset}"\nlora = true\n'
        "steps = 6\nseed = 3\n"
    )
    run_train(teacher.http_url, teacher.api_key, student_dir, tmp_path / "run", "--config", str(config))
    train = [r for r in read_metrics(tmp_path / "run") if not r.get("eval")]
    assert {r["on_policy"] for r in train} == {0, 1}  # both sources used at λ = 0.5
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["lora"] is True and saved["loss"] == "jsd"


def test_sigkill_then_resume_has_no_gap_and_no_repeat(teacher, student_dir, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OPD_TEACHER_API_KEY": teacher.api_key}
    cmd = train_cmd(teacher.http_url, student_dir, out, "--steps", "8", "--save-every", "2")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(out, 5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(train_steps(out))
    assert 5 <= killed_at < 8
    run_train(
        teacher.http_url, teacher.api_key, student_dir, out, "--steps", "8", "--save-every", "2", "--resume"
    )
    assert train_steps(out) == list(range(1, 9))
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step-000008"


def test_sigterm_checkpoints_and_resume_continues(teacher, student_dir, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OPD_TEACHER_API_KEY": teacher.api_key}
    cmd = train_cmd(teacher.http_url, student_dir, out, "--steps", "30", "--save-every", "100")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(out, 2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    stopped_at = max(train_steps(out))
    assert f"stopped by SIGTERM at step {stopped_at}" in output
    assert (out / "checkpoints" / f"step-{stopped_at:06d}").is_dir()
    run_train(teacher.http_url, teacher.api_key, student_dir, out, "--steps", str(stopped_at + 2), "--resume")
    assert train_steps(out) == list(range(1, stopped_at + 3))


def test_teacher_outage_mid_run_is_waited_out(tmp_path, student_dir, tiny_model_dir):
    """Stop the teacher after a few steps, start it again on the same port: the run completes."""
    port, grpc_port = free_port(), free_port()
    first = start_teacher(tmp_path / "t1", [f"tiny={tiny_model_dir}"], port=port, grpc_port=grpc_port)
    out = tmp_path / "run"
    env = {**os.environ, "OPD_TEACHER_API_KEY": first.api_key}
    cmd = train_cmd(first.http_url, student_dir, out, "--steps", "8", "--save-every", "0")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(out, 2)
        first.stop()
        time.sleep(8)  # the trainer hits the outage and waits
        second = start_teacher(tmp_path / "t2", [f"tiny={tiny_model_dir}"], port=port, grpc_port=grpc_port)
        output, _ = proc.communicate(timeout=300)
        second.stop()
    finally:
        proc.kill()
        first.stop()
    assert proc.returncode == 0, output[-3000:]
    assert "teacher unreachable" in output
    assert train_steps(out) == list(range(1, 9))


def test_wrong_url_is_a_clear_error_at_start(student_dir, tmp_path):
    r = run_train(
        f"http://127.0.0.1:{free_port()}",
        "k",
        student_dir,
        tmp_path / "run",
        "--steps",
        "1",
        "--teacher-wait-s",
        "1",
        check=False,
        timeout=120,
    )
    assert r.returncode != 0
    assert "cannot reach a teacher service at http://127.0.0.1:" in r.stderr


def test_tokenizer_mismatch_is_a_clear_error_at_start(teacher, student_dir, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    tokenizer.add_tokens(["<|my_new_token|>"])
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    r = run_train(teacher.http_url, teacher.api_key, other, tmp_path / "run", "--steps", "1", check=False)
    assert r.returncode != 0 and "tokenizer differs from teacher 'tiny'" in r.stderr


def test_existing_run_needs_resume(teacher, student_dir, tmp_path):
    run_train(teacher.http_url, teacher.api_key, student_dir, tmp_path / "run", "--steps", "1")
    r = run_train(
        teacher.http_url, teacher.api_key, student_dir, tmp_path / "run", "--steps", "2", check=False
    )
    assert r.returncode != 0 and "pass --resume" in r.stderr
