"""The method options as TrainConfig settings: every recipe loads, bad values are clear errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from opd_student.config import TrainConfig, add_config_flags, config_from_args, read_config_file

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.toml"))


def test_there_is_a_recipe_per_method():
    names = {p.stem for p in RECIPES}
    assert {"opd", "topd", "popd", "ta-opd", "fire-opd", "privileged", "token-mask", "teachers"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_with_the_demo_settings(recipe):
    cfg = TrainConfig(**read_config_file(recipe))
    assert (cfg.steps, cfg.prompts_per_step, cfg.samples_per_prompt, cfg.max_new_tokens) == (24, 4, 2, 48)
    assert cfg.teacher_url is None and cfg.student == "default"  # runs on the embedded defaults


def test_flags_override_a_recipe():
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(["--config", str(RECIPES[0].parent / "topd.toml"), "--horizon-ratio", "0.5"])
    args2 = parser.parse_args(["--config", str(RECIPES[0].parent / "ta-opd.toml"), "--no-ta-opd"])
    assert config_from_args(args).horizon_ratio == 0.5
    assert config_from_args(args2).ta_opd is False


@pytest.mark.parametrize(
    ("settings", "phrase"),
    [
        ({"horizon_ratio": 0.0}, "horizon_ratio"),
        ({"horizon_every": 0}, "horizon_every"),
        ({"horizon_start": -1}, "horizon_start"),
        ({"ta_fraction": 0.0}, "ta_fraction"),
        ({"fire_drop_fraction": 1.0}, "fire_drop_fraction"),
        ({"teacher_rules": "no arrow here"}, "teacher_rules"),
        ({"loss_regex": "(unclosed"}, "loss_regex"),
        ({"loss_token_ids": "1, two"}, "loss_token_ids"),
        ({"loss": "chunk", "ta_opd": True}, "ta_opd needs a logprob loss"),
    ],
)
def test_bad_method_settings_are_clear_errors(settings, phrase):
    with pytest.raises(ValueError, match=phrase):
        TrainConfig(**settings)
