"""Each method end to end: `opd train` with a recipe-like config, 2-3 steps of a tiny student against a
real teacher service, and metrics.jsonl shows the method acted. Runs in-process (the same `train` the CLI
calls) to keep the suite fast; the teacher is a real `opd serve-teacher` serving one tiny model twice."""

from __future__ import annotations

import json
import math
import signal

import pytest

from helpers import make_tiny_model, post_score, start_teacher
from opd_client.convert import score_result_from_json
from opd_student.config import TrainConfig
from opd_student.methods.routing import parse_teacher_rules
from opd_student.metrics_log import read_metrics
from opd_student.prompts import load_prompts, render
from opd_student.rollout_factory import RolloutFactory
from opd_student.run import check_routed_teachers
from opd_student.teacher_link import TeacherLink

FAST = dict(
    prompts_per_step=2,
    samples_per_prompt=2,
    max_new_tokens=8,
    top_k=8,
    eval_num_prompts=2,
    eval_max_new_tokens=4,
    teacher_model="tiny",
    lr=1e-3,
    steps=2,
    save_every=0,
    max_staleness=1,
)


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_dir):
    proc = start_teacher(
        tmp_path_factory.mktemp("methods-teacher"), [f"tiny={tiny_model_dir}", f"tiny2={tiny_model_dir}"]
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("methods-student") / "student", layers=2, seed=1)


@pytest.fixture
def run(service, student, tmp_path, monkeypatch):
    """run(**settings) → the training records of a finished run."""
    monkeypatch.setenv("OPD_TEACHER_API_KEY", service.api_key)

    def go(**settings):
        from opd_student.train import train

        where = {"teacher_url": service.http_url, "student": str(student), "out": str(tmp_path / "run")}
        cfg = TrainConfig(**{**FAST, **where, **settings})
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:  # train() installs its own SIGINT/SIGTERM handlers: give pytest its own back
            train(cfg)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        return [r for r in read_metrics(cfg.out) if not r.get("eval")]

    return go


def write_prompts(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_topd_generation_stops_at_the_horizon(run):
    records = run(max_new_tokens=16, horizon_ratio=0.25)
    for r in records:
        assert r["gen/horizon"] == 4
        assert r["gen/max_len"] <= 4 and r["gen/tokens"] == r["tokens"] <= 4 * r["rollouts"]


def test_popd_horizon_follows_the_schedule(run):
    records = run(max_new_tokens=16, steps=3, horizon_start=2, horizon_growth=3, horizon_every=1)
    assert [r["gen/horizon"] for r in records] == [2, 5, 8]  # min(16, 2 + 3·k)
    assert all(r["gen/max_len"] <= r["gen/horizon"] for r in records)


def test_ta_opd_keeps_the_top_fraction_of_tokens(run):
    records = run(ta_opd=True, ta_fraction=0.25, ta_student_top_k=4)
    for r in records:
        assert r["select/tokens"] == math.ceil(0.25 * r["tokens"])
        assert r["select/teachability_chosen_mean"] >= r["select/teachability_mean"]


def test_fire_opd_drops_the_worst_rollout_and_reweights(run):
    records = run(fire_opd=True, fire_drop_fraction=0.25)  # 4 rollouts a step: one dropped
    for r in records:
        assert r["select/rollouts_dropped"] == 1
        assert r["select/token_fraction"] < 1 and 0 < r["select/weight_mean"] <= 1


def test_privileged_context_reaches_the_teacher(run, tmp_path):
    rows = [
        {
            "id": f"q{i}",
            "prompt": f"Question {i}:",
            "teacher_messages": [{"role": "user", "content": f"Answer {i}"}],
        }
        for i in range(3)
    ]
    records = run(prompts=write_prompts(tmp_path / "p.jsonl", rows))
    assert all(r["gen/privileged"] == 1.0 for r in records)
    records = run(
        prompts=str(tmp_path / "p.jsonl"), privileged_context=False, out=str(tmp_path / "r2"), steps=1
    )
    assert all(r["gen/privileged"] == 0.0 for r in records)


def test_teacher_scores_the_completion_after_the_privileged_prefix(service, student, tmp_path):
    """The trainer's path (prompt file → rollout → TeacherLink) gives the scores of the completion after
    teacher_messages, not after the student's prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student)
    rows = [
        {
            "id": "a",
            "prompt": "The capital of France is",
            "teacher_messages": [{"role": "user", "content": "Say Paris."}],
        }
    ]
    prompt = load_prompts(write_prompts(tmp_path / "p.jsonl", rows))[0]
    cfg = TrainConfig(teacher_model="tiny")
    student_ids = render(prompt, tokenizer)
    completion = tokenizer(" Paris, of course.", add_special_tokens=False)["input_ids"]
    rollout = RolloutFactory(tokenizer, cfg.teacher_model).group(prompt, student_ids, [completion])[0]
    teacher_ids = render(prompt, tokenizer, for_teacher=True)
    assert rollout.teacher_prefix_ids == teacher_ids != student_ids
    link = TeacherLink(service.http_url, service.api_key, 60, 2, 10)
    try:
        got = link.collect(link.submit([rollout], 4))[0].token_logprobs_T.tolist()
    finally:
        link.close()

    def direct(prefix):
        seq = {"token_ids": prefix + completion, "prompt_len": len(prefix)}
        body = post_score(service, {"model": "tiny", "sequences": [seq], "top_k": 4})
        return score_result_from_json(body).sequences[0].token_logprobs_T.tolist()

    assert got == pytest.approx(direct(teacher_ids), abs=1e-5)
    assert got != pytest.approx(direct(student_ids), abs=1e-3)


def test_token_restricted_loss_uses_only_matched_tokens(run, tmp_path):
    rows = [{"id": f"s{i}", "prompt": f"Say something {i}", "loss_spans": [[0, 2]]} for i in range(3)]
    records = run(prompts=write_prompts(tmp_path / "p.jsonl", rows), loss_token_ids="2")
    for r in records:
        assert r["select/tokens"] < r["tokens"] and r["select/token_fraction"] < 1


def test_several_teachers_are_routed_and_logged(run, tmp_path, service, student):
    rows = [{"id": "m", "prompt": "What is 2 + 3?"}, {"id": "w", "prompt": "Name a colour."}]
    records = run(prompts=write_prompts(tmp_path / "p.jsonl", rows), teacher_rules="[0-9] => tiny2")
    for r in records:  # both prompts every step (2 prompts per step), 2 samples each
        assert r["teacher/rollouts/tiny"] == 2 and r["teacher/rollouts/tiny2"] == 2
        assert r["teacher/tokens/tiny"] + r["teacher/tokens/tiny2"] == r["tokens"]
        assert "kl/sampled_reverse/tiny2" in r


def test_unknown_routed_teacher_is_a_clear_error_at_start(service, student):
    from transformers import AutoTokenizer

    rules = parse_teacher_rules("[0-9] => nope")
    prompts = load_prompts("default-train")
    link = TeacherLink(service.http_url, service.api_key, 60, 2, 10)
    try:
        with pytest.raises(SystemExit, match="no model 'nope'"):
            tokenizer = AutoTokenizer.from_pretrained(student)
            check_routed_teachers(link, tokenizer, prompts, rules, "tiny", lambda info, url: None)
    finally:
        link.close()
