"""Requests cut to the teacher's per-request limits (opd_client.request_split): the cut itself, the
service's refusal it avoids, and the trainer's link scoring a step that exceeds max_tokens through a real
`opd serve-teacher` with every sequence's answer equal to scoring it alone."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import start_teacher
from opd_client.errors import TooManyTokens
from opd_client.request_split import split_requests, teacher_view_len
from opd_client.schema import ModelInfo, ScoreRequest, Sequence
from opd_student.rollouts import Rollout
from opd_student.teacher_link import TeacherLink
from opd_teacher.validate import validate_score_request


def info(max_tokens: int = 100, hidden_size: int | None = 8, max_hidden_bytes: int | None = 640) -> ModelInfo:
    return ModelInfo(
        name="m", revision="r", vocab_size=50, tokenizer_sha256="s", max_top_k=5, max_tokens=max_tokens,
        max_sequence_len=100, dtype="float32", device="cpu", source="test", hidden_size=hidden_size,
        head_sha256="h" if hidden_size else None, max_hidden_bytes=max_hidden_bytes,
    )  # fmt: skip


def test_teacher_view_len_counts_the_context_the_teacher_runs():
    assert teacher_view_len([1, 2, 3, 4, 5], 2, None) == 5
    assert (
        teacher_view_len([1, 2, 3, 4, 5], 2, [7, 7, 7, 7]) == 4 + 3
    )  # privileged context replaces the prompt
    assert teacher_view_len([1, 2, 3], 0, None) == 1 + 3  # an empty context still runs a BOS


def test_groups_stay_within_max_tokens_in_order():
    sizes = [(40, 10), (40, 10), (30, 10), (90, 10), (150, 10), (5, 1)]
    assert split_requests(sizes, info()) == [[0, 1], [2], [3], [4], [5]]  # 150 alone: the service names it


def test_with_hidden_states_groups_also_stay_within_max_hidden_bytes():
    # 8 × 4 bytes per scored token in float32: 640 bytes are 20 scored tokens; in bfloat16, 40
    sizes = [(10, 12), (10, 12), (10, 12), (10, 12)]
    assert split_requests(sizes, info(), return_hidden=True) == [[0], [1], [2], [3]]
    assert split_requests(sizes, info(), return_hidden=True, hidden_dtype="bfloat16") == [[0, 1, 2], [3]]
    assert split_requests(sizes, info()) == [[0, 1, 2, 3]]  # no hidden states asked: tokens only


def test_the_service_refuses_what_the_split_avoids_naming_the_limit():
    model = info(max_hidden_bytes=640)
    seqs = [Sequence(token_ids=list(range(1, 14)), prompt_len=1)] * 2  # 24 scored tokens: 768 bytes
    with pytest.raises(TooManyTokens, match="max_hidden_bytes") as e:
        validate_score_request(ScoreRequest(sequences=seqs, top_k=1, return_hidden=True), model, 1)
    assert e.value.field == "sequences"
    validate_score_request(ScoreRequest(sequences=seqs[:1], top_k=1, return_hidden=True), model, 1)


@pytest.fixture(scope="module")
def small_teacher(tmp_path_factory, tiny_model_dir):
    proc = start_teacher(
        tmp_path_factory.mktemp("teacher"),
        models=[f"tiny={tiny_model_dir}"],
        extra_args=["--max-tokens", "64"],
    )
    yield proc
    proc.stop()


def test_the_link_scores_a_step_beyond_max_tokens_in_several_requests(small_teacher):
    rng = np.random.default_rng(0)
    rollouts = [
        Rollout(
            prompt_ids=rng.integers(3, 1000, 10).tolist(), completion_ids=rng.integers(3, 1000, 15).tolist()
        )
        for _ in range(6)
    ]  # 25 teacher-view tokens each, 150 in all: 3 requests of 2 under max_tokens = 64
    link = TeacherLink(small_teacher.http_url, small_teacher.api_key, 60.0, 2, 30.0)
    try:
        sequences = [{"token_ids": r.prompt_ids + r.completion_ids, "prompt_len": 10} for r in rollouts]
        with pytest.raises(TooManyTokens, match="max_tokens = 64"):
            link.client.score(sequences, top_k=3, return_hidden=True)
        link.check(_tokenizer(), None)
        pending = link.submit(rollouts, 3, return_hidden=True)
        assert len(pending.futures) == 3
        got = link.collect(pending)
        for seq, answer in zip(sequences, got, strict=True):
            (alone,) = link.client.score([seq], top_k=3, return_hidden=True).sequences
            np.testing.assert_array_equal(answer.top_ids_T_K, alone.top_ids_T_K)
            np.testing.assert_allclose(answer.hidden_T_D, alone.hidden_T_D, atol=1e-5)
            np.testing.assert_allclose(answer.token_logprobs_T, alone.token_logprobs_T, atol=1e-5)
    finally:
        link.close()


def _tokenizer():
    from transformers import AutoTokenizer

    from opd_common.embedded import embedded_teacher_dir

    return AutoTokenizer.from_pretrained(embedded_teacher_dir())
