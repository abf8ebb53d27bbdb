"""`opd train --teacher-follows-student N`: the student's weights pushed to the teacher it trains against.

A tiny 2-layer student trains 2 steps against a real `opd serve-teacher --weight-updates` serving the same
architecture; after the run the teacher must answer as an in-process forward of the run's final/ weights
(the last push was after the last step), within TOL = 1e-4 (two fp32 forwards of the same weights that
differ in summation order only, as in test_live_weights.py). LoRA runs push merged weights (checked
against peft's own merge); every step's record says which teacher versions scored it and which it pushed.
Runs in-process (the same `train` the CLI calls), like tests/test_methods_train.py.
"""

from __future__ import annotations

import signal

import pytest
import torch
from weights_helpers import SEQUENCES, TOP_K, max_diff, reference

from helpers import make_tiny_model, start_teacher
from opd_client import HttpTeacherClient
from opd_student.config import TrainConfig
from opd_student.metrics_log import read_metrics
from opd_student.teacher_follow import merged_lora

TOL = 1e-4
FAST = dict(
    prompts_per_step=2,
    samples_per_prompt=2,
    max_new_tokens=8,
    top_k=8,
    eval_num_prompts=2,
    eval_max_new_tokens=4,
    lr=1e-3,
    steps=2,
    save_every=0,
)
VERSION_KEYS = ("teacher/weights_version_min", "teacher/weights_version_max", "teacher/pushed_version")


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("follow-student") / "student", layers=2, seed=1)


@pytest.fixture(scope="module")
def service(tmp_path_factory, student):
    """A teacher serving the student's architecture (its starting weights), taking updates."""
    proc = start_teacher(
        tmp_path_factory.mktemp("follow-teacher"), [f"student={student}"], extra_args=["--weight-updates"]
    )
    yield proc
    proc.stop()


@pytest.fixture
def run(student, tmp_path, monkeypatch):
    """run(service, **settings) → (run directory, its step records)."""

    def go(service, **settings):
        from opd_student.train import train

        monkeypatch.setenv("OPD_TEACHER_API_KEY", service.api_key)
        where = {"teacher_url": service.http_url, "student": str(student), "out": str(tmp_path / "run")}
        cfg = TrainConfig(**{**FAST, **where, **settings})
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:  # train() installs its own SIGINT/SIGTERM handlers: give pytest its own back
            train(cfg)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        return tmp_path / "run", [r for r in read_metrics(cfg.out) if not r.get("eval")]

    return go


def teacher_version(service) -> int:
    with HttpTeacherClient(service.http_url, api_key=service.api_key) as client:
        return client.models()[0].weights_version


def teacher_scores(service):
    with HttpTeacherClient(service.http_url, api_key=service.api_key) as client:
        return client.score(SEQUENCES, top_k=TOP_K)


@pytest.mark.parametrize("lora", [False, True])
def test_the_teacher_answers_as_the_final_student(service, run, lora):
    """Full weights, and LoRA adapters merged: after the run the teacher is the run's final/ model."""
    start = teacher_version(service)
    out, records = run(service, teacher_follows_student=1, max_staleness=0, lora=lora)
    assert [r["teacher/pushed_version"] for r in records] == [start + 1, start + 2]
    # max_staleness 0: step 1's rollouts were scored before any push, step 2's after the first
    assert [(r["teacher/weights_version_min"], r["teacher/weights_version_max"]) for r in records] == [
        (start, start),
        (start + 1, start + 1),
    ]
    assert all(r["time/push_s"] > 0 for r in records)
    result = teacher_scores(service)
    assert result.weights_version == start + 2
    assert max_diff(result, reference(out / "final")) <= TOL


def test_every_n_steps_and_pipelined_scoring(service, run):
    """N = 2 pushes after step 2 only; with max_staleness 1 both steps' rollouts were sent before it."""
    start = teacher_version(service)
    _, records = run(service, teacher_follows_student=2, max_staleness=1)
    assert ["teacher/pushed_version" in r for r in records] == [False, True]
    assert records[1]["teacher/pushed_version"] == start + 1
    assert [r["teacher/weights_version_max"] for r in records] == [start, start]


def test_off_by_default_nothing_is_pushed_or_logged(service, run):
    start = teacher_version(service)
    _, records = run(service)
    assert not any(key in r for r in records for key in (*VERSION_KEYS, "time/push_s"))
    assert teacher_version(service) == start


def test_a_teacher_that_cannot_follow_is_refused(student, tiny_model_dir, run, tmp_path_factory):
    """Without --weight-updates: refused at start, naming the flag. Another architecture (the 4-layer tiny
    model for the 2-layer student): refused at the first push, which asks for all tensors, and the teacher
    keeps its weights."""
    off = start_teacher(tmp_path_factory.mktemp("no-updates"), [f"student={student}"])
    other = start_teacher(
        tmp_path_factory.mktemp("other-arch"), [f"tiny={tiny_model_dir}"], extra_args=["--weight-updates"]
    )
    try:
        with pytest.raises(SystemExit, match="does not take weight updates; start it with"):
            run(off, teacher_follows_student=1)
        with pytest.raises(SystemExit, match="refused the student's weights: .*all_tensors"):
            run(other, teacher_follows_student=1)
        assert teacher_version(other) == 0
    finally:
        off.stop()
        other.stop()


def test_merged_lora_is_peft_merge(student):
    """The pushed weights of a LoRA student equal peft's merge_and_unload of the same adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(student, dtype=torch.float64),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], lora_dropout=0.0),
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero: give the adapters something to merge
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    ours = merged_lora(model.get_base_model().state_dict(), scaling=8 / 4)
    theirs = model.merge_and_unload().state_dict()
    assert sorted(ours) == sorted(theirs)
    moved = 0
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=1e-12)
        moved += "q_proj" in name or "down_proj" in name
    assert moved == 4  # q_proj and down_proj of both layers were merged


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_fsdp_shards_are_gathered_for_the_push(service, student, tmp_path, lora):
    """2 processes under torchrun with FSDP2: every rank joins the gather, rank 0 pushes the full (and
    merged) weights, and the teacher then answers as the run's final/ model."""
    import os
    import subprocess

    from opd_student.distributed import opd_command

    start = teacher_version(service)
    out = tmp_path / "run"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]
    cmd = [*opd_command(2), "train", "--teacher-url", service.http_url, "--student", str(student)]
    cmd += ["--out", str(out), "--parallel", "fsdp", "--teacher-follows-student", "1", "--max-staleness", "0"]
    cmd += [*flags, *(["--lora"] if lora else [])]
    env = {**os.environ, "OPD_TEACHER_API_KEY": service.api_key}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    records = [x for x in read_metrics(out) if not x.get("eval")]
    assert [x["teacher/pushed_version"] for x in records] == [start + 1, start + 2]
    assert max_diff(teacher_scores(service), reference(out / "final")) <= TOL
