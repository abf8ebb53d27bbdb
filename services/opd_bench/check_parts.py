"""A check made of named parts under one time budget, recorded part by part in one JSON file.

A part runs only if the parts it needs succeeded and enough of the budget is left; otherwise it is recorded
as skipped, with the reason. A part that raises is recorded as failed and the check goes on with the parts
that do not need it. The file is rewritten after every part, so a run stopped from outside (a hard timeout)
still leaves every figure measured until then.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


class CheckRun:
    def __init__(self, out: Path, header: dict, budget_s: float, min_part_s: float):
        self.out = out
        self.data: dict[str, Any] = {**header, "budget_s": budget_s, "parts": []}
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.min_part_s = min_part_s
        self.write()

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def status(self, name: str) -> str | None:
        return next((p["status"] for p in self.data["parts"] if p["name"] == name), None)

    def run(self, name: str, fn: Callable[[], dict], needs: tuple[str, ...] = ()) -> dict | None:
        """fn's result (also recorded under the part's name), or None when skipped or failed."""
        missing = [n for n in needs if self.status(n) != "ok"]
        if missing:
            self._record(name, "skipped", reason=f"needs {', '.join(missing)}")
            return None
        if self.remaining_s() < self.min_part_s:
            self._record(name, "skipped", reason=f"time budget spent ({self.remaining_s():.0f} s left)")
            return None
        print(f"[{self.elapsed_s():.0f} s] {name} ...", flush=True)
        started = time.monotonic()
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - recorded; the parts that do not need this one still run
            self._record(name, "failed", seconds=time.monotonic() - started, error=_error_text(e))
            return None
        except BaseException as e:  # SIGTERM from the wrapper's timeout, Ctrl-C: record, then stop
            self._record(name, "failed", seconds=time.monotonic() - started, error=f"stopped: {e!r}")
            raise
        self._record(name, "ok", seconds=time.monotonic() - started, result=result)
        return result

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def _record(self, name: str, status: str, **fields: Any) -> None:
        self.data["parts"].append({"name": name, "status": status, **fields})
        self.write()
        seconds = f" in {fields['seconds']:.1f} s" if "seconds" in fields else ""
        error_lines = str(fields.get("error", "")).strip().splitlines()
        why = fields.get("reason") or (error_lines[-1] if error_lines else "")
        print(f"[{self.elapsed_s():.0f} s] {name}: {status}{seconds} {why}".rstrip(), flush=True)

    def write(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed_s(), 1)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.out)  # never a half-written file, even when killed mid-write


def _error_text(e: Exception) -> str:
    """The exception and the last frames of its traceback (enough to find the line, short enough to read)."""
    frames = traceback.format_exception(type(e), e, e.__traceback__)
    return "".join(frames)[-3000:]
