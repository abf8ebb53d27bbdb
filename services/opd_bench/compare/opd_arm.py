"""The opd arms: `opd train` as a subprocess against the shared teacher service, with its own defaults
except for the settings every arm shares; its metrics.jsonl read back into steps.jsonl / evals.jsonl.

Evaluation is opd's own `--eval-every` (the same evaluate() the other arms' snapshots go through); it runs
between steps and is not in the time/* fields, whose sum per step is the step's time here.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from opd_bench.compare.records import EVALS, STEPS, append_jsonl, read_jsonl
from opd_bench.compare.settings import JSD_BETA, OPD_TOP_K, CompareSettings

LOSS_FLAGS = {
    "opd-rkl": ["--loss", "reverse_kl"],
    "opd-jsd": ["--loss", "jsd", "--jsd-beta", str(JSD_BETA), "--top-k", str(OPD_TOP_K)],
    "opd-exact-rkl": ["--loss", "exact_reverse_kl"],
    "opd-exact-jsd": ["--loss", "exact_jsd", "--jsd-beta", str(JSD_BETA)],
}
RUN = "run"  # opd's run directory inside the arm's directory
EVAL_KEYS = ("eval/reverse_kl", "eval/topk_forward_kl", "eval/tokens")
EXACT_KEYS = ("eval/exact_reverse_kl", "eval/exact_forward_kl")  # when the teacher serves hidden states


def command(settings: CompareSettings, arm: str, teacher_url: str, arm_dir: Path) -> list[str]:
    s = settings
    flags = {
        "--teacher-url": teacher_url,
        "--student": s.student,
        "--prompts": s.train_prompts,
        "--eval-prompts": s.eval_prompts,
        "--steps": s.steps,
        "--prompts-per-step": s.prompts_per_step,
        "--samples-per-prompt": s.samples_per_prompt,
        "--max-new-tokens": s.max_new_tokens,
        "--temperature": 1.0,
        "--lr": s.lr,
        "--lr-schedule": "constant",
        "--warmup-steps": 0,
        "--weight-decay": 0.0,
        "--grad-clip": 1.0,
        "--micro-batch-size": s.micro_batch,
        "--seed": s.seed,
        "--device": s.device,
        "--eval-every": s.eval_every,
        "--eval-num-prompts": s.eval_num_prompts,
        "--eval-max-new-tokens": s.eval_max_new_tokens,
        "--save-every": 0,  # only the final checkpoint (not timed either way)
        "--keep-checkpoints": 1,
        "--out": arm_dir / RUN,
    }
    args = [sys.executable, "-m", "opd_cli.main", "train", *LOSS_FLAGS[arm]]
    for flag, value in flags.items():
        args += [flag, str(value)]
    return args


def read_back(arm_dir: Path) -> None:
    """steps.jsonl and evals.jsonl from opd's metrics.jsonl: a step's time is the sum of its time/* fields
    (sampling, waiting for scores, the optimiser step), its teacher tokens the completion tokens scored."""
    for name in (STEPS, EVALS):
        (arm_dir / name).unlink(missing_ok=True)
    for record in read_jsonl(arm_dir / RUN / "metrics.jsonl"):
        if record.get("eval"):
            keys = EVAL_KEYS + tuple(k for k in EXACT_KEYS if k in record)
            append_jsonl(arm_dir / EVALS, {"step": record["step"], **{k: record[k] for k in keys}})
        else:
            time_s = step_time(record)
            append_jsonl(
                arm_dir / STEPS,
                {"step": record["step"], "time_s": time_s, "teacher_tokens": int(record["tokens"])},
            )


def step_time(record: dict) -> float:
    """A train record's wall time: its time/step_s if the trainer logs a total, else the sum of its parts."""
    if "time/step_s" in record:
        return float(record["time/step_s"])
    return float(sum(v for k, v in record.items() if k.startswith("time/")))


def progress_count(arm_dir: Path) -> int:
    return sum(1 for r in read_jsonl(arm_dir / RUN / "metrics.jsonl") if not r.get("eval"))


def cleanup(arm_dir: Path, keep_final: bool) -> None:
    """The checkpoint (weights + optimiser state) is not needed; the final student only if asked to keep."""
    shutil.rmtree(arm_dir / RUN / "checkpoints", ignore_errors=True)
    if not keep_final:
        shutil.rmtree(arm_dir / RUN / "final", ignore_errors=True)
