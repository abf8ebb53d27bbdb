"""One training run = one subprocess, so its peak RSS is its own: os.wait4 returns the rusage of exactly
that child (getrusage(RUSAGE_CHILDREN) would give the largest of all children so far)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ChildResult:
    returncode: int
    wall_s: float  # the whole process: start-up, model loading, training, in-process evaluation
    peak_rss_bytes: int
    log_path: Path


def child_env() -> dict[str, str]:
    """The environment every run gets: the same threading policy as `opd` (idle OpenMP threads sleep, so
    the teacher service and the trainer do not slow each other down), no API key, no tokenizer threads."""
    env = os.environ.copy()
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.pop("OPD_TEACHER_API_KEY", None)  # the shared service runs without one (TRL's VLLMClient sends none)
    return env


def run_child(
    cmd: list[str], log_path: Path, progress: Callable[[], str | None] | None = None, every_s: float = 5.0
) -> ChildResult:
    """Run cmd with stdout+stderr in log_path; call progress() every every_s seconds and print what it
    returns (None: nothing new). Returns the exit code, wall time and peak RSS of the child."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env())
    started = time.perf_counter()
    done = threading.Event()

    def report() -> None:
        while not done.wait(every_s):
            line = progress() if progress else None
            if line:
                print(line, flush=True)

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # Ctrl-C: stop the child too, then pass the interrupt on
        proc.terminate()
        with contextlib.suppress(ChildProcessError):
            os.wait4(proc.pid, 0)
        raise
    finally:
        done.set()
        reporter.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
    if progress:
        line = progress()
        if line:
            print(line, flush=True)
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    return ChildResult(proc.returncode, time.perf_counter() - started, int(peak), log_path)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""
