"""Session fixtures: a tiny model directory and one real teacher service process shared by the tests."""

from __future__ import annotations

import os

# The threading policy `opd` itself sets (opd_cli/main.py) before torch loads, for the torch work this
# process does in-process: idle OpenMP threads sleep instead of spinning. Spinning threads on cores shared
# with a teacher process or another job stall each other at every parallel region (a bfloat16 forward of
# the default teacher measured 7.5 s instead of 0.6 s on 2 busy cores). Numbers are unchanged: the same
# threads split the same work. Read once, when torch's OpenMP loads, hence here, before any test module.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from helpers import make_tiny_model, start_teacher  # noqa: E402

DEFAULT = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def teacher(tmp_path_factory, tiny_model_dir):
    """`opd serve-teacher` serving the default teacher (first, default) and the tiny model as "tiny"."""
    proc = start_teacher(
        tmp_path_factory.mktemp("teacher"),
        models=[DEFAULT, f"tiny={tiny_model_dir}"],
        extra_args=["--max-top-k", "49152", "--max-tokens", "16384"],
    )
    yield proc
    proc.stop()
