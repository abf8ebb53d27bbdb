"""`opd bench compare`: the pure helpers against direct computations, and the real command end to end at
the smallest size (5 arms x 2 steps of 2 rollouts x 8 tokens, 2 held-out prompts; about 2 minutes here)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import start_teacher
from opd_bench.compare import opd_arm
from opd_bench.compare.budget import eval_points, fit_to_budget, prompt_schedule, repeated_rows, steps_for
from opd_bench.compare.records import ARM, EVALS, STEPS, append_jsonl, read_jsonl
from opd_bench.compare.results import arm_summary, ranking, table_markdown
from opd_bench.compare.settings import ARM_NAMES, CompareSettings, select_arms
from opd_student.prompts import PromptStream, load_prompts

# --- budget matching -------------------------------------------------------------------------------------


def samples_of(lengths):
    """(prompt_ids, completion_ids) pairs whose completions have these lengths; token t of sample i is
    1000 * i + t, so a test can see which tokens were kept."""
    return [([7, i], [1000 * i + t for t in range(n)]) for i, n in enumerate(lengths)]


@pytest.mark.parametrize("budget", [0, 1, 5, 6, 7, 13, 20])
def test_fit_to_budget_takes_whole_samples_in_order_and_cuts_the_last(budget):
    samples = samples_of([5, 0, 3, 8, 4])  # 20 tokens; the empty completion is skipped
    got = fit_to_budget(samples, budget)
    assert sum(len(c) for _, c in got) == budget
    # direct: the first `budget` tokens of the concatenated completions, regrouped by sample
    flat = [tok for _, c in samples for tok in c][:budget]
    assert [tok for _, c in got for tok in c] == flat
    kept = [i for i, (_, c) in enumerate(samples) if c and c[0] in flat]
    assert [p for p, _ in got] == [samples[i][0] for i in kept]


def test_fit_to_budget_reads_an_endless_generator_only_as_far_as_needed():
    drawn = []

    def endless():
        i = 0
        while True:
            drawn.append(i)
            yield [i], [i] * 48
            i += 1

    got = fit_to_budget(endless(), 100)
    assert [len(c) for _, c in got] == [48, 48, 4]
    assert drawn == [0, 1, 2]


def test_fit_to_budget_refuses_too_few_samples():
    with pytest.raises(ValueError, match="ran out at 8 of 9"):
        fit_to_budget(samples_of([5, 3]), 9)


@pytest.mark.parametrize("n, per_step", [(1, 8), (8, 8), (9, 8), (17, 4), (120, 8)])
def test_steps_for(n, per_step):
    steps = steps_for(n, per_step)
    assert (steps - 1) * per_step < n <= steps * per_step


# --- schedule and evaluation points -------------------------------------------------------------------------


@pytest.mark.parametrize("steps, every", [(15, 5), (16, 4), (2, 1), (7, 3), (16, 0), (3, 10)])
def test_eval_points_are_where_opd_train_evaluates(steps, every):
    # train.py: before the first step, after step s when every and s % every == 0 and s < steps, at the end
    want = [0] + [s for s in range(1, steps) if every and s % every == 0] + [steps]
    assert eval_points(steps, every) == want


def test_schedule_is_opds_prompt_order_and_rows_repeat_each_prompt():
    prompts = load_prompts("default-train")
    schedule = prompt_schedule(prompts, seed=3, steps=60, prompts_per_step=4)  # 240 > 198: crosses an epoch
    stream = PromptStream(prompts, seed=3)
    assert [p.id for step in schedule for p in step] == [next(stream).id for _ in range(240)]
    rows = repeated_rows(schedule[:2], 3)
    assert [p.id for p in rows] == [p.id for step in schedule[:2] for p in step for _ in range(3)]


def test_settings_micro_batch_divides_the_step():
    assert (CompareSettings().micro_batch, CompareSettings().accumulation_steps) == (4, 2)
    s = CompareSettings(prompts_per_step=3, samples_per_prompt=1, micro_batch_size=2)  # 2 does not divide 3
    assert (s.micro_batch, s.accumulation_steps) == (3, 1)
    assert [a.name for a in select_arms("sft, opd-rkl")] == ["opd-rkl", "sft"]  # opd-rkl first: the budget
    with pytest.raises(ValueError, match="unknown arm"):
        select_arms("opd-rkl,nope")


# --- reading runs back, the table ------------------------------------------------------------------------


def write_arm(arm_dir: Path, step_times, step_tokens, evals: dict[int, float], meta: dict) -> None:
    arm_dir.mkdir(parents=True)
    for i, (t, n) in enumerate(zip(step_times, step_tokens, strict=True), 1):
        append_jsonl(arm_dir / STEPS, {"step": i, "time_s": t, "teacher_tokens": n})
    for step, kl in evals.items():
        append_jsonl(
            arm_dir / EVALS,
            {"step": step, "eval/reverse_kl": kl, "eval/topk_forward_kl": kl / 2, "eval/tokens": 100},
        )
    (arm_dir / ARM).write_text(json.dumps(meta))


def test_arm_summary_puts_each_evaluation_at_the_time_and_tokens_spent_so_far(tmp_path):
    write_arm(
        tmp_path / "sft",
        [1.5, 2.0, 2.5],
        [10, 20, 5],
        {0: 3.0, 2: 2.0, 3: 1.5},
        {"data_time_s": 7.0, "peak_rss_bytes": 3 * 2**30},
    )
    s = arm_summary(tmp_path / "sft")
    assert [(e["step"], e["time_s"], e["teacher_tokens"]) for e in s["evals"]] == [
        (0, 0.0, 0),
        (2, 7.0 + 1.5 + 2.0, 30),
        (3, 7.0 + 6.0, 35),
    ]
    assert (s["train_time_s"], s["total_time_s"], s["time_per_step_s"]) == (6.0, 13.0, 2.0)
    assert (s["teacher_tokens"], s["peak_rss_mib"], s["kl_start"], s["kl_end"]) == (35, 3072, 3.0, 1.5)


def test_table_has_a_row_per_arm_ranked_by_final_kl(tmp_path):
    for name, kl_end in [("opd-rkl", 1.2), ("trl-distill", 0.9), ("sft", 1.5)]:
        write_arm(tmp_path / name, [1.0, 1.0], [8, 8], {0: 2.0, 2: kl_end}, {"peak_rss_bytes": 2**30})
    arms = [arm_summary(tmp_path / n) for n in ("opd-rkl", "trl-distill", "sft")]
    assert ranking(arms) == ["trl-distill", "opd-rkl", "sft"]
    rows = [line for line in table_markdown(arms).splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in rows}) == 1  # every row has the header's columns
    body = {line.split("|")[2].strip(): line.split("|") for line in rows[2:]}
    assert {name: int(cells[1]) for name, cells in body.items()} == {"trl-distill": 1, "opd-rkl": 2, "sft": 3}
    assert body["sft"][11].strip() == "1.500" and body["sft"][8].strip() == "16"


def test_opd_metrics_become_steps_and_evals(tmp_path):
    run = tmp_path / "opd-rkl" / opd_arm.RUN
    run.mkdir(parents=True)
    records = [
        {"step": 0, "eval": True, "eval/reverse_kl": 2.0, "eval/topk_forward_kl": 1.0, "eval/tokens": 90},
        {"step": 1, "time/sample_s": 3.0, "time/score_wait_s": 0.5, "time/train_s": 2.0, "tokens": 300},
        {"step": 2, "time/score_wait_s": 0.25, "time/train_s": 2.0, "tokens": 280, "loss": 0.1},
        {"step": 2, "eval": True, "eval/reverse_kl": 1.5, "eval/topk_forward_kl": 0.9, "eval/tokens": 95},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    opd_arm.read_back(tmp_path / "opd-rkl")
    assert read_jsonl(tmp_path / "opd-rkl" / STEPS) == [
        {"step": 1, "time_s": 5.5, "teacher_tokens": 300},
        {"step": 2, "time_s": 2.25, "teacher_tokens": 280},
    ]
    assert [r["eval/reverse_kl"] for r in read_jsonl(tmp_path / "opd-rkl" / EVALS)] == [2.0, 1.5]


# --- the real command ------------------------------------------------------------------------------------

SMALL = dict(steps=2, prompts_per_step=2, samples_per_prompt=1, max_new_tokens=8, eval_every=1)
SMALL_EVAL = dict(eval_num_prompts=2, eval_max_new_tokens=8)


def run_bench(out: Path, *extra: str) -> tuple[str, dict]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**SMALL, **SMALL_EVAL}.items()]
    cmd = [sys.executable, "-m", "opd_cli.main", "bench", "compare", *flags, "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    stdout, results = run_bench(out, "--keep-snapshots")  # kept: opd-rkl's final student is evaluated below
    yield out, stdout, results
    for weights in [*out.glob("*/snapshots"), *out.glob(f"*/{opd_arm.RUN}/final")]:  # ~400 MB each
        shutil.rmtree(weights)


@pytest.mark.slow
def test_outputs_hold_every_arm(bench):
    out, stdout, results = bench
    assert [a["arm"] for a in results["arms"]] == list(ARM_NAMES) and results["failed"] == []
    assert sorted(results["ranking"]) == sorted(ARM_NAMES)
    rows = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("| ")]
    assert [line.split("|")[2].strip() for line in rows[1:]] == list(ARM_NAMES)
    for png in ("kl_vs_time.png", "kl_vs_teacher_tokens.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 10_000
    import torch
    import transformers
    import trl

    v = results["versions"]
    assert v["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert (v["transformers"], v["trl"]) == (transformers.__version__, trl.__version__)
    assert re.fullmatch(r"[0-9a-f]{40}", v["opd_commit"])
    assert results["settings"] == CompareSettings(**SMALL, **SMALL_EVAL).to_dict()
    assert f"[{len(ARM_NAMES)}/{len(ARM_NAMES)}] sft" in stdout and "step 2/2" in stdout  # progress lines


@pytest.mark.slow
def test_budgets_tokens_and_steps(bench):
    out, _, results = bench
    arms = {a["arm"]: a for a in results["arms"]}
    most = SMALL["steps"] * SMALL["prompts_per_step"] * SMALL["max_new_tokens"]
    for name in ("opd-rkl", "opd-jsd", "opd-exact-rkl", "opd-exact-jsd", "trl-distill", "trl-server"):
        a = arms[name]
        assert a["steps"] == SMALL["steps"] and 0 < a["teacher_tokens"] <= most, a
        assert [e["step"] for e in a["evals"]] == [0, 1, 2]
    # SFT: exactly opd-rkl's teacher tokens (granularity 1 token), at the same sequences per step
    sft = arms["sft"]
    assert sft["teacher_tokens"] == arms["opd-rkl"]["teacher_tokens"]
    meta = json.loads((out / "sft" / ARM).read_text())
    assert meta["budget"] == arms["opd-rkl"]["teacher_tokens"] and "opd-rkl" in meta["budget_source"]
    assert sft["steps"] == steps_for(
        meta["sequences"], SMALL["prompts_per_step"] * SMALL["samples_per_prompt"]
    )
    assert [e["step"] for e in sft["evals"]] == eval_points(sft["steps"], SMALL["eval_every"])
    for a in arms.values():  # the table's numbers are the per-step records' sums
        steps = read_jsonl(out / a["arm"] / STEPS)
        assert sum(r["teacher_tokens"] for r in steps) == a["teacher_tokens"]
        assert all(r["time_s"] > 0 for r in steps)
        assert math.isclose(sum(r["time_s"] for r in steps), a["train_time_s"])


@pytest.mark.slow
def test_kls_and_memory(bench):
    _, _, results = bench
    arms = {a["arm"]: a for a in results["arms"]}
    for a in arms.values():
        assert all(math.isfinite(e["reverse_kl"]) and e["reverse_kl"] > 0 for e in a["evals"]), a
        assert all(math.isfinite(e["topk_forward_kl"]) and e["topk_forward_kl"] > 0 for e in a["evals"]), a
        # every arm's students, opd's in-process and the others' from disk, get the exact KL too
        assert all(math.isfinite(e["exact_reverse_kl"]) and e["exact_reverse_kl"] > 0 for e in a["evals"]), a
    # step 0 is the same untrained student evaluated the same way, in-process (opd) or from disk (others)
    for key in ("kl_start", "exact_kl_start"):
        start = {name: a[key] for name, a in arms.items()}
        assert max(start.values()) - min(start.values()) < 1e-4, (key, start)
    # peak RSS is per run (wait4 of that child): the in-process teacher (135M fp32 = 540 MB) shows in
    # trl-distill alone, and the arm after it is smaller again (a running maximum could not drop)
    opd_peak = max(arms["opd-rkl"]["peak_rss_mib"], arms["opd-jsd"]["peak_rss_mib"])
    assert arms["trl-distill"]["peak_rss_mib"] > opd_peak + 200, {
        n: a["peak_rss_mib"] for n, a in arms.items()
    }
    assert arms["trl-server"]["peak_rss_mib"] < arms["trl-distill"]["peak_rss_mib"] - 200


@pytest.mark.slow
def test_snapshot_evaluation_equals_opds_in_process_evaluation(bench, tmp_path):
    """The non-opd arms are evaluated from saved weights in a fresh process; opd evaluates in-process. The
    same weights must give the same numbers both ways: opd-rkl's final student, from disk."""
    out, _, results = bench
    final = out / "opd-rkl" / opd_arm.RUN / "final"
    spec = tmp_path / "spec.json"
    CompareSettings(**SMALL, **SMALL_EVAL, student=str(final)).save(spec)
    teacher = start_teacher(
        tmp_path / "teacher", ["smollm2-135m-instruct"], api_key=None, extra_args=["--batch-invariant"]
    )
    try:
        cmd = [sys.executable, "-m", "opd_bench.compare.snapshot_eval", "--spec", str(spec)]
        cmd += ["--teacher-url", teacher.http_url, "--initial-out", str(tmp_path / "eval.json")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        teacher.stop()
    from_disk = json.loads((tmp_path / "eval.json").read_text())
    in_process = next(a for a in results["arms"] if a["arm"] == "opd-rkl")["evals"][-1]
    assert from_disk["eval/tokens"] == in_process["eval_tokens"]
    assert math.isclose(from_disk["eval/reverse_kl"], in_process["reverse_kl"], abs_tol=1e-4)
    assert math.isclose(from_disk["eval/topk_forward_kl"], in_process["topk_forward_kl"], abs_tol=1e-4)
    assert math.isclose(from_disk["eval/exact_reverse_kl"], in_process["exact_reverse_kl"], abs_tol=1e-4)


@pytest.mark.slow
def test_a_rerun_gives_the_same_numbers(bench, tmp_path):
    """Fixed seeds and a batch-invariant teacher: the two arms that talk to the service while training
    (opd's pipelined scoring, TRL's server client) reproduce every evaluation exactly."""
    _, _, first = bench
    _, again = run_bench(tmp_path / "again", "--only", "opd-rkl,trl-server")
    before = {a["arm"]: a for a in first["arms"]}
    for a in again["arms"]:
        assert a["teacher_tokens"] == before[a["arm"]]["teacher_tokens"]
        assert [(e["step"], e["reverse_kl"], e["topk_forward_kl"]) for e in a["evals"]] == [
            (e["step"], e["reverse_kl"], e["topk_forward_kl"]) for e in before[a["arm"]]["evals"]
        ]
