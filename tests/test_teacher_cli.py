"""`opd serve-teacher`'s flags come from its limits dataclasses: one flag per field, with the field's default
and its comment as --help; parsing them gives the dataclasses back, and a real service runs under them."""

from __future__ import annotations

import argparse
import dataclasses
import re

import httpx
import pytest

from helpers import post_score, start_teacher
from opd_common.dataclass_flags import add_dataclass_flags, dataclass_from_args
from opd_teacher import cli
from opd_teacher.backends.hf import HFLimits
from opd_teacher.batcher import BatchLimits
from opd_teacher.blackbox.api_client import ApiLimits

LIMITS = (HFLimits, BatchLimits, ApiLimits)


def serve_teacher_parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="opd")
    sub = root.add_subparsers()
    cli.register(sub)
    return sub.choices["serve-teacher"]


def action_for(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    """The one visible flag that sets `dest` (hidden deprecated aliases aside)."""
    found = [a for a in parser._actions if a.dest == dest and a.help != argparse.SUPPRESS]
    assert len(found) == 1, f"{dest}: {len(found)} visible flags set it"
    return found[0]


def parse(*argv: str) -> argparse.Namespace:
    return serve_teacher_parser().parse_args(list(argv))


def other_value(action: argparse.Action, default):
    """(argv, value): flags that set the field to a value other than its default."""
    if isinstance(action, argparse.BooleanOptionalAction):
        positive, negative = action.option_strings
        return [negative if default else positive], not default
    if action.type is int:
        value = 7 if default is None else default + 3
    elif action.type is float:
        value = default + 0.25
    else:
        raise AssertionError(f"{action.dest}: no test value for type {action.type}")
    return [action.option_strings[0], str(value)], value


@pytest.mark.parametrize("cls", LIMITS, ids=lambda c: c.__name__)
def test_every_limit_has_one_flag_with_the_fields_default_and_a_meaning(cls):
    parser = serve_teacher_parser()
    for f in dataclasses.fields(cls):
        action = action_for(parser, f.name)
        assert action.default == f.default, f"{cls.__name__}.{f.name}: flag default {action.default!r}"
        meaning = re.sub(r"\(default: [^)]*\)", "", action.help or "").strip()
        assert meaning, (
            f"{cls.__name__}.{f.name} ({action.option_strings}): --help says nothing: {action.help!r}"
        )


@pytest.mark.parametrize("cls", LIMITS, ids=lambda c: c.__name__)
def test_no_flags_give_the_dataclass_defaults_and_each_flag_sets_its_field(cls):
    assert dataclass_from_args(cls, parse()) == cls()
    parser = serve_teacher_parser()
    argv, expected = [], {}
    for f in dataclasses.fields(cls):
        flags, expected[f.name] = other_value(action_for(parser, f.name), f.default)
        argv += flags
    assert dataclass_from_args(cls, parser.parse_args(argv)) == cls(**expected)


def test_max_batch_tokens_is_one_setting_for_the_batcher_and_the_forwards():
    settings = [(cls.__name__, f.name) for cls in LIMITS for f in dataclasses.fields(cls)]
    assert [cls for cls, name in settings if name == "max_batch_tokens"] == ["BatchLimits"]
    batch = dataclass_from_args(BatchLimits, parse("--max-batch-tokens", "1234"))
    (loader,) = cli.hf_loaders(parse("--model", "t=/nowhere"), batch).values()
    assert loader.keywords["batch"].max_batch_tokens == 1234  # what HFBackend packs its forwards by


@pytest.mark.parametrize(
    "argv,field,value",
    [
        (["--no-prefix-reuse"], "prefix_reuse", False),
        (["--batch-invariant"], "batch_invariant", True),
        (["--max-wait-ms", "2.5"], "max_wait_ms", 2.5),
        (["--api-timeout", "9"], "timeout_s", 9.0),
        (["--api-max-backoff", "2"], "max_backoff_s", 2.0),
        (["--api-max-attempts", "1"], "max_attempts", 1),
        (["--api-max-concurrency", "3"], "max_concurrency", 3),
    ],
)
def test_the_flags_users_know_keep_their_names(argv, field, value):
    assert getattr(parse(*argv), field) == value


def test_score_chunk_tokens_is_a_hidden_deprecated_alias(capsys):
    assert parse("--score-chunk-tokens", "64").logits_block_tokens == 64
    assert "--score-chunk-tokens is deprecated; use --logits-block-tokens" in capsys.readouterr().err
    assert parse().logits_block_tokens == HFLimits().logits_block_tokens
    text = serve_teacher_parser().format_help()
    assert "--score-chunk-tokens" not in text and "--logits-block-tokens" in text


def test_help_names_every_visible_flag():
    parser = serve_teacher_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.help != argparse.SUPPRESS:
            for flag in action.option_strings:
                assert flag in text, flag


def test_api_limits_assemble_their_retry_policy():
    retry = ApiLimits(max_attempts=2, initial_backoff_s=0.1, max_backoff_s=3.0, jitter=0.0).retry
    assert (retry.max_attempts, retry.initial_backoff_s, retry.max_backoff_s, retry.jitter) == (
        2,
        0.1,
        3.0,
        0.0,
    )


def test_a_field_whose_dest_a_parser_already_has_is_refused():
    @dataclasses.dataclass
    class Clash:
        port: int = 1  # a second flag for the same dest would share its value silently

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int)
    with pytest.raises(ValueError, match="Clash.port"):
        add_dataclass_flags(parser, Clash)


def test_the_real_service_serves_under_the_limits_its_flags_set(tiny_model_dir, tmp_path):
    """The flags reach the backend and the batcher of a running `opd serve-teacher`: the limits /v1/models
    reports, a request over --max-top-k refused, one within it scored (old flag spellings included)."""
    flags = ["--max-top-k", "5", "--max-sequence-len", "48", "--max-tokens", "96", "--max-wait-ms", "1"]
    flags += ["--score-chunk-tokens", "4", "--no-prefix-reuse", "--max-batch-tokens", "64"]
    teacher = start_teacher(tmp_path, [f"tiny={tiny_model_dir}"], extra_args=flags)
    try:
        auth = {"Authorization": f"Bearer {teacher.api_key}"}
        info = httpx.get(f"{teacher.http_url}/v1/models", headers=auth, timeout=60).json()["data"][0]
        assert (info["max_top_k"], info["max_sequence_len"], info["max_tokens"]) == (5, 48, 96), info
        seq = {"token_ids": list(range(1, 20)), "prompt_len": 4}
        body = post_score(teacher, {"model": "tiny", "sequences": [seq], "top_k": 5})
        assert len(body["sequences"]) == 1
        r = httpx.post(
            f"{teacher.http_url}/v1/score",
            json={"model": "tiny", "sequences": [seq], "top_k": 6},
            headers=auth,
            timeout=60,
        )
        assert r.status_code in (400, 422) and "top_k" in r.text, r.text
    finally:
        teacher.stop()
