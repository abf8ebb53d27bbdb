"""The files every arm leaves in its directory, whatever tool trained it.

steps.jsonl  one line a step: {"step", "time_s", "teacher_tokens"}; time_s is the step's wall time without
             evaluation or snapshotting; teacher_tokens are the completion tokens the teacher scored (or,
             for SFT, generated) for that step
evals.jsonl  one line an evaluation point: {"step", "eval/reverse_kl", "eval/topk_forward_kl", "eval/tokens"}
arm.json     the run: exit code, peak RSS, process wall time, data time (SFT's teacher sampling), settings
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STEPS = "steps.jsonl"
EVALS = "evals.jsonl"
ARM = "arm.json"
SNAPSHOTS = "snapshots"


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line still being written
                break
    return out


def snapshot_dir(arm_dir: Path, step: int) -> Path:
    return arm_dir / SNAPSHOTS / f"step-{step:05d}"


def snapshot_step(path: Path) -> int:
    return int(path.name.split("-", 1)[1])
