"""Methods II end to end: `opd train` (in-process, the function the CLI calls) for 2 steps of a tiny student
against a real `opd serve-teacher`, one run per method; metrics.jsonl shows each method acted. Plus the
exactness check of the recorded behaviour logprobs: at max_staleness 0 in float64 the off-policy corrected
run is plain OPD."""

from __future__ import annotations

import json
import math
import signal

import pytest

from helpers import make_tiny_model, start_teacher
from opd_student.config import TrainConfig
from opd_student.metrics_log import read_metrics

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
    proc = start_teacher(tmp_path_factory.mktemp("zoo2-teacher"), [f"tiny={tiny_model_dir}"])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("zoo2-student") / "student", layers=2, seed=1)


@pytest.fixture
def run(service, student, tmp_path, monkeypatch):
    """run(**settings) → (the training records, the run directory)."""
    monkeypatch.setenv("OPD_TEACHER_API_KEY", service.api_key)
    count = [0]

    def go(**settings):
        from opd_student.train import train

        count[0] += 1
        out = tmp_path / f"run{count[0]}"
        where = {"teacher_url": service.http_url, "student": str(student), "out": str(out)}
        cfg = TrainConfig(**{**FAST, **where, **settings})
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:  # train() installs its own SIGINT/SIGTERM handlers: give pytest its own back
            train(cfg)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        return [r for r in read_metrics(cfg.out) if not r.get("eval")], out

    return go


@pytest.mark.parametrize("kind", ["truncate", "clip", "drpo"])
def test_off_policy_corrections_weight_stale_rollouts(run, kind):
    records, _ = run(off_policy_correction=kind)
    for r in records:
        assert math.isfinite(r["loss"]) and r["offpolicy/ratio_max"] >= r["offpolicy/ratio_mean"] > 0
        assert 0 <= r["offpolicy/corrected_fraction"] <= 1
    # the second step trains on rollouts sampled before the first step's update (max_staleness 1)
    assert records[1]["offpolicy/abs_log_ratio_mean"] > 0


def test_at_staleness_zero_in_float64_the_correction_is_plain_opd(run):
    """Recorded μ equals the trained q up to decoding vs full-forward rounding: ratio 1, the same run."""
    exact = dict(max_staleness=0, weights_dtype="float64", bf16="false")
    plain, _ = run(**exact)
    corrected, _ = run(off_policy_correction="truncate", **exact)
    for a, b in zip(plain, corrected, strict=True):
        assert b["offpolicy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
        for key in ("loss", "kl/sampled_reverse", "grad_norm", "tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_gae_opd_and_near_future_guidance_train(run):
    records, _ = run(gae_opd=True, gae_gamma=0.9, gae_lambda=0.8)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["pg/advantage_mean"]) for r in records)
    records, _ = run(near_future_window=3, near_future_threshold=0.5)
    assert all(0 <= r["pg/near_future_kept"] <= 1 for r in records)


def test_lookahead_group_reward_scores_the_candidates(run):
    records, _ = run(lookahead_group=True, lookahead_candidates=3, lookahead_positions=2)
    for r in records:  # 4 rollouts × (at most) 2 positions × 3 candidates, one scored position each
        assert 0 < r["teacher/lookahead_positions"] <= 4 * 2 * 3 and math.isfinite(r["loss"])


def test_cr_opd_routes_on_the_students_top_k(run):
    records, _ = run(cr_opd=True, cr_top_k=4, cr_threshold=100.0)  # every token routed
    assert all(r["pg/routed_fraction"] == pytest.approx(1.0) for r in records)


@pytest.mark.parametrize("form", ["truncated", "truncated_sg"])
def test_student_topk_forms_train(run, form):
    records, _ = run(loss="student_topk_reverse_kl", student_topk_form=form)
    assert all(math.isfinite(r["loss"]) for r in records)


def test_trb_blends_early_rollouts_and_anneals(run):
    records, _ = run(trb_epsilon=0.5, trb_steps=2, off_policy_correction="truncate")
    assert [r["trb/epsilon"] for r in records] == pytest.approx([0.5, 0.25])
    assert all(r["teacher/sampling_positions"] > 0 and 0 < r["trb/beta_mean"] <= 1 for r in records)


def test_trd_lets_the_teacher_continue_failing_rollouts(run):
    records, _ = run(trd=True, trd_min_logprob=0.0)  # every token "fails": the teacher writes from token 0
    for r in records:
        assert r["trd/refined_fraction"] == 1.0 and r["trd/generated_tokens"] > 0
        assert r["trd/teacher_tokens"] == r["tokens"]


def test_cold_start_and_prompt_selection_run_before_the_first_step(run, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}:"}) + "\n" for i in range(6))
    )
    records, out = run(
        prompts=str(prompts), cold_start_steps=2, prompt_selection_fraction=0.5, prompt_selection_tokens=4
    )
    cold = json.loads((out / "cold_start.json").read_text())
    assert cold["steps"] == 2 and len(cold["loss"]) == 2 and cold["teacher_tokens"] > 0
    selection = json.loads((out / "prompt_selection.json").read_text())
    assert len(selection["kept"]) == 3 and len(selection["alignment"]) == 6
    assert len(records) == 2
