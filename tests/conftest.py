"""Session fixtures: a tiny model directory and one real teacher service process shared by the tests."""

from __future__ import annotations

import pytest

from helpers import make_tiny_model, start_teacher

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
