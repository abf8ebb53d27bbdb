"""`opd bench xtok`'s table from an arm's files (hand-made here; the arms themselves are measured in
docs/benchmarks.md): step times, peak RSS, the per-byte KL before and after, an all-empty answer set."""

from __future__ import annotations

import json
import math

import pytest

from opd_bench.xtok.runner import summarise, table


def write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_rows_and_table_from_the_arms_files(tmp_path):
    (tmp_path / "opd").mkdir()
    (tmp_path / "opd" / "arm.json").write_text(json.dumps({"returncode": 0, "peak_rss_bytes": 3 * 2**30}))
    write(
        tmp_path / "opd" / "run" / "metrics.jsonl",
        [
            {"step": 0, "eval": True, "eval/reverse_kl_per_byte": 0.5, "eval/bytes": 100, "eval/prompts": 4},
            {"step": 1, "time/sample_s": 2.0, "time/train_s": 1.0, "loss": 0.0},
            {"step": 2, "time/sample_s": 4.0, "time/train_s": 1.0, "loss": 0.0},
            {"step": 2, "eval": True, "eval/reverse_kl_per_byte": 0.3, "eval/reverse_kl_per_answer": 9.0,
             "eval/bytes": 120, "eval/prompts": 4},
        ],
    )  # fmt: skip
    (tmp_path / "gold").mkdir()
    (tmp_path / "gold" / "arm.json").write_text(json.dumps({"returncode": 0, "peak_rss_bytes": 2**31}))
    write(tmp_path / "gold" / "steps.jsonl", [{"step": 1, "time_s": 10.0}, {"step": 2, "time_s": 20.0}])
    (tmp_path / "gold" / "eval_before.json").write_text(json.dumps({"eval/reverse_kl_per_byte": 0.5}))
    after = {
        "eval/reverse_kl_per_byte": math.nan,
        "eval/reverse_kl_per_answer": 25.0,
        "eval/bytes": 0,
        "eval/prompts": 4,
    }
    (tmp_path / "gold" / "eval_after.json").write_text(json.dumps(after))
    opd, gold = summarise(tmp_path, "opd"), summarise(tmp_path, "gold")
    assert (opd["steps"], opd["s_per_step"], opd["peak_rss_gib"]) == (2, 4.0, 3.0)
    assert opd["change"] == (0.3 - 0.5) / 0.5 and opd["answer_bytes_after"] == 30.0
    assert (gold["s_per_step"], gold["kl_per_byte_after"], gold["change"]) == (15.0, None, None)
    text = table([opd, gold])
    assert "| opd | 2 | 4.0, 4.0 | 3.00 | 0.5000 → 0.3000 | -40.0% | 9.00, 30.0 |" in text
    assert "undefined (every answer empty)" in text and "25.00, 0.0" in text


@pytest.mark.slow  # ~1-2 min on 2 busy cores (TRL's start-up and a 262k-token teacher tokenizer)
def test_the_gold_arm_trains_tiny_models_with_real_trl(tmp_path, tiny_model_dir):
    """The real GOLDTrainer on a tiny student (SmolLM2's tokenizer) and a tiny teacher with Gemma 3's: one
    step, then its final student is a model the per-byte evaluation can load."""
    import subprocess
    import sys

    from xtok_helpers import make_tiny_gemma_tokenizer_model

    from opd_bench.compare.settings import CompareSettings

    teacher = make_tiny_gemma_tokenizer_model(tmp_path / "tiny-gemma")
    spec = tmp_path / "spec.json"
    CompareSettings(
        steps=1, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=8, micro_batch_size=2,
        student=str(tiny_model_dir), teacher=str(teacher), eval_every=0,
    ).save(spec)  # fmt: skip
    cmd = [
        sys.executable,
        "-m",
        "opd_bench.xtok.gold_arm",
        "--spec",
        str(spec),
        "--out",
        str(tmp_path / "gold"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    steps = [json.loads(line) for line in (tmp_path / "gold" / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1]
    assert (tmp_path / "gold" / "final" / "config.json").exists()
    args = json.loads((tmp_path / "gold" / "trainer_args.json").read_text())
    assert (args["use_uld_loss"], args["use_extended_uld"], args["lmbda"]) == (True, False, 1.0)
