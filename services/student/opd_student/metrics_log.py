"""metrics.jsonl: one JSON object a line, durable line by line, trimmed back to a checkpoint on resume.

Every write is flushed and fsync'ed, so a SIGKILL loses at most the line being written; opening the log
cuts such a half-written last line off. On resume the trainer calls `truncate_after(checkpoint_step)` so
the records after the checkpoint (which the resumed run will write again) appear once: no gap, no repeat.
TensorBoard event files are written too when the `tensorboard` package is installed (it is optional).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # tensorboard is optional: imported when the first record is written
    from torch.utils.tensorboard import SummaryWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsLog:
    """Appends records to run_dir/metrics.jsonl; each record is a dict with "step" (eval records also
    have "eval": true). A "timestamp" (unix seconds) is added when the record has none."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        drop_partial_last_line(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held open for the run)
        self._tensorboard = tensorboard and importlib.util.find_spec("tensorboard") is not None
        self._writer: SummaryWriter | None = None
        self._purge_step: int | None = None

    def log(self, record: dict[str, Any]) -> None:
        record = {k: _to_builtin(v) for k, v in record.items()}
        record.setdefault("timestamp", round(time.time(), 3))
        # One write of the whole line: a kill can leave only a prefix without its newline, never a
        # mix of two records.
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._log_tensorboard(record)

    def truncate_after(self, step: int) -> int:
        """Drop records with "step" > step (kept: records without a step); returns how many were dropped."""
        self._file.close()
        records = read_metrics(self.path)
        kept = [r for r in records if not isinstance(r.get("step"), int) or r["step"] <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # atomic: a kill here leaves either the old or the new file
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held open for the run)
        # TensorBoard cannot edit its event files; it drops events at or after purge_step when a writer
        # opens with it, which is the same cut.
        self._purge_step = step + 1
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return len(records) - len(kept)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _log_tensorboard(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if not self._tensorboard or not isinstance(step, int):
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=self._purge_step)
            self._purge_step = None
        for key, value in record.items():
            if key in ("step", "timestamp", "eval") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()


def read_metrics(run_dir_or_file: str | Path) -> list[dict[str, Any]]:
    """All complete records of a run's metrics.jsonl (a half-written last line is ignored)."""
    path = Path(run_dir_or_file)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (is this a run directory?)")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1]:  # no final newline: the writer was killed mid-line
        lines = lines[:-1]
    records = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def drop_partial_last_line(path: Path) -> None:
    """Cut the file back to its last newline (a no-op when it ends with one or does not exist)."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        # Scan backwards in blocks: the file can be long, the partial line is short.
        while end > 0:
            start = max(0, end - 4096)
            f.seek(start)
            block = f.read(end - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        else:
            keep = 0
        if keep != size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())


def _to_builtin(value: Any) -> Any:
    """numpy / torch scalars to Python numbers; non-finite floats kept (Python's json reads NaN back)."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value
