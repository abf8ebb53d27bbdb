"""mypy (pinned in the dev extra, configured in pyproject.toml's [tool.mypy]) finds no error in the packages.

About 20 s cold on 2 busy cores, about 1 s with its cache (.mypy_cache) warm.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = [
    "client/opd_client",
    "services/opd_common",
    "services/teacher/opd_teacher",
    "services/student/opd_student",
    "services/opd_bench",
    "services/opd_cli",
]


def test_mypy_finds_no_error_in_the_packages():
    r = subprocess.run(
        [sys.executable, "-m", "mypy", *PACKAGES],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, f"mypy exited {r.returncode}:\n{r.stdout}{r.stderr}"
