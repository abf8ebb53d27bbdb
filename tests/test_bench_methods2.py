"""opd bench methods2's bookkeeping on a hand-made run directory: the summary of a run (KL before and
after, teacher tokens with the methods' extra positions and the cold start's), the tables, the run list."""

from __future__ import annotations

import json

import pytest

from opd_bench import methods2


def _run_dir(tmp_path, arm, seed):
    run_dir = methods2.run_dir_of(arm, seed, tmp_path)
    run_dir.mkdir(parents=True)
    records = [
        {"step": 0, "eval": True, "eval/reverse_kl": 1.7, "eval/exact_reverse_kl": 1.6},
        {
            "step": 1,
            "tokens": 300,
            "teacher/lookahead_positions": 48,
            "time/sample_s": 2.0,
            "time/train_s": 1.0,
        },
        {
            "step": 2,
            "tokens": 280,
            "teacher/sampling_positions": 20,
            "time/sample_s": 2.5,
            "time/train_s": 1.5,
        },
        {"step": 2, "eval": True, "eval/reverse_kl": 1.2, "eval/exact_reverse_kl": 1.1},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "cold_start.json").write_text(json.dumps({"teacher_tokens": 100}))
    return run_dir


def test_a_run_is_summarised_from_its_metrics(tmp_path):
    arm = methods2.Arm("cold start", "cold-start")
    run_dir = _run_dir(tmp_path, arm, 0)
    r = methods2.summarise(arm, 0, run_dir, 99.0, 1.0, 2.0, ["python", "-m", "opd_cli.main", "train"])
    assert (r["kl_before"], r["kl_after"], r["exact_before"], r["exact_after"]) == (1.7, 1.2, 1.6, 1.1)
    assert r["teacher_tokens"] == 300 + 48 + 280 + 20 + 100
    assert r["train_s"] == pytest.approx(7.0) and r["wall_s"] == 99.0
    again = methods2.resummarise([r], tmp_path, [0, 1])
    assert again == [r]
    text = methods2.table([r, {**r, "seed": 1, "key": methods2.key(arm, 1), "kl_after": 1.4}])
    assert "| cold start | 0 | 1.700 → 1.200 | 1.600 → 1.100 | 99 | 7 | 748 |" in text
    assert "| cold start | 2 | 1.300 (1.200, 1.400) |" in text


def test_the_run_list_puts_the_staleness_table_first_and_covers_every_recipe():
    runs = methods2.arms([0, 1])
    assert [a.group for a, _ in runs[:6]] == ["staleness"] * 6
    recipes = {a.recipe for a, _ in runs}
    assert all((methods2.RECIPES / f"{name}.toml").is_file() for name in recipes)
    assert len({methods2.key(a, s) for a, s in runs}) == len(runs) == 6 + 2 * 12 + 2 * 3
