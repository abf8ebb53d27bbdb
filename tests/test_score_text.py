"""POST /v1/score-text and gRPC ScoreText against the real service: a tiny model with Gemma 3's tokenizer
(the other tokenizer) and one with the default teacher's. The text answer must be /v1/score's numbers for
the teacher's own tokens of the same text, with byte spans that tile the completion."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from transformers import AutoTokenizer
from xtok_helpers import make_tiny_gemma_tokenizer_model

from helpers import post_score, start_teacher
from opd_client.grpc_client import GrpcTeacherClient
from opd_client.http_client import HttpTeacherClient

COMPLETION = "Hello world, naïve café 😀 tokenization!\n\n  ok"
MESSAGES = [{"role": "user", "content": "Say something."}]
ATOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir):
    gemma = make_tiny_gemma_tokenizer_model(tmp_path_factory.mktemp("models") / "tiny-gemma")
    return {"gemma": gemma, "tiny": tiny_model_dir}


@pytest.fixture(scope="module")
def service(tmp_path_factory, models):
    proc = start_teacher(
        tmp_path_factory.mktemp("teacher-text"),
        models=[f"gemma={models['gemma']}", f"tiny={models['tiny']}"],
        extra_args=["--max-tokens", "4096", "--max-sequence-len", "256"],
    )
    yield proc
    proc.stop()


def post(service, body: dict) -> httpx.Response:
    headers = {"Authorization": f"Bearer {service.api_key}"}
    return httpx.post(f"{service.http_url}/v1/score-text", json=body, timeout=120, headers=headers)


@pytest.mark.parametrize("name", ["gemma", "tiny"])
def test_text_scores_are_the_token_scores_of_the_teachers_own_tokens(service, models, name):
    tokenizer = AutoTokenizer.from_pretrained(models[name])
    body = {"model": name, "top_k": 5, "sequences": [{"messages": MESSAGES, "completion": COMPLETION}]}
    r = post(service, body)
    assert r.status_code == 200, r.text
    seq = r.json()["sequences"][0]
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(COMPLETION, add_special_tokens=False)["input_ids"]
    assert seq["token_ids"] == ids and seq["prompt_tokens"] == len(prompt_ids)
    # the spans tile the completion's bytes, in order, and each span's bytes are its token's text
    raw = COMPLETION.encode()
    assert seq["completion_bytes"] == len(raw)
    ends = [0] + [b for _, b in seq["byte_spans"]]
    assert [a for a, _ in seq["byte_spans"]] == ends[:-1] and ends[-1] == len(raw)
    assert b"".join(raw[a:b] for a, b in seq["byte_spans"]) == raw
    assert all(
        raw[a:b].decode() == t
        for (a, b), t in zip(seq["byte_spans"], seq["tokens"], strict=True)
        if "\ufffd" not in t
    )
    # the same numbers as /v1/score of those ids
    want = post_score(
        service,
        {
            "model": name,
            "top_k": 5,
            "sequences": [{"token_ids": prompt_ids + ids, "prompt_len": len(prompt_ids)}],
        },
    )["sequences"][0]
    np.testing.assert_allclose(seq["token_logprobs"], want["token_logprobs"], atol=ATOL)
    np.testing.assert_allclose(seq["top_logprobs"], want["top_logprobs"], atol=ATOL)
    np.testing.assert_allclose(seq["tail_logprobs"], want["tail_logprobs"], atol=ATOL)
    strings = [
        [
            tokenizer.decode([i])
            if i not in tokenizer.all_special_ids
            else tokenizer.convert_ids_to_tokens(i)
            for i in row
        ]
        for row in want["top_ids"]
    ]
    for got_row, want_row in zip(seq["top_tokens"], strings, strict=True):
        assert [g for g in got_row if "\ufffd" not in g] == [w for w in want_row if "\ufffd" not in w]


def test_a_multi_byte_character_split_over_byte_tokens_keeps_exact_byte_spans(service):
    r = post(service, {"model": "tiny", "sequences": [{"prompt": "x", "completion": "😀"}]})
    assert r.status_code == 200, r.text
    seq = r.json()["sequences"][0]
    assert len(seq["token_ids"]) >= 2  # byte-level BPE splits the 4-byte emoji
    assert seq["byte_spans"][0][0] == 0 and seq["byte_spans"][-1][1] == 4
    assert all(b > a for a, b in seq["byte_spans"])  # every piece owns some of the bytes


def test_completion_ends_appends_the_end_of_turn_token_with_an_empty_span(service, models):
    for name, end in (("gemma", "<end_of_turn>"), ("tiny", "<|im_end|>")):
        body = {
            "model": name,
            "sequences": [{"messages": MESSAGES, "completion": "Hi.", "completion_ends": True}],
        }
        r = post(service, body)
        assert r.status_code == 200, r.text
        seq = r.json()["sequences"][0]
        assert seq["tokens"][-1] == end and seq["byte_spans"][-1] == [3, 3]
        assert seq["top_tokens"] is None and seq["tail_logprobs"] is None  # top_k 0


def test_raw_text_prompt_is_tokenized_with_the_tokenizers_special_tokens(service, models):
    tokenizer = AutoTokenizer.from_pretrained(models["gemma"])
    r = post(service, {"model": "gemma", "sequences": [{"prompt": "The sky is", "completion": " blue."}]})
    assert r.status_code == 200, r.text
    seq = r.json()["sequences"][0]
    prompt_ids = tokenizer("The sky is")["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id and seq["prompt_tokens"] == len(prompt_ids)
    ids = seq["token_ids"]
    want = post_score(
        service,
        {
            "model": "gemma",
            "top_k": 1,
            "sequences": [{"token_ids": prompt_ids + ids, "prompt_len": len(prompt_ids)}],
        },
    )["sequences"][0]
    np.testing.assert_allclose(seq["token_logprobs"], want["token_logprobs"], atol=ATOL)


def test_grpc_gives_the_http_answer(service):
    body = {
        "model": "gemma",
        "top_k": 3,
        "sequences": [
            {"messages": MESSAGES, "completion": COMPLETION, "completion_ends": True},
            {"prompt": "Two words:", "completion": " naïve café"},
        ],
    }
    with HttpTeacherClient(service.http_url, api_key=service.api_key) as http:
        over_http = http.score_text(body)
    with GrpcTeacherClient(service.grpc_target, api_key=service.api_key) as grpc_client:
        over_grpc = grpc_client.score_text(body)
    assert over_http.model == over_grpc.model == "gemma"
    assert over_http.usage == over_grpc.usage
    for a, b in zip(over_http.sequences, over_grpc.sequences, strict=True):
        assert (a.token_ids, a.tokens, a.byte_spans, a.top_tokens) == (
            b.token_ids,
            b.tokens,
            b.byte_spans,
            b.top_tokens,
        )
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-6)
        np.testing.assert_allclose(a.top_logprobs, b.top_logprobs, atol=1e-6)


@pytest.mark.parametrize(
    ("sequence", "extra", "status", "field"),
    [
        ({"messages": MESSAGES, "completion": ""}, {}, 400, "sequences[0].completion"),
        ({"messages": MESSAGES, "prompt": "x", "completion": "a"}, {}, 400, "sequences[0].messages"),
        ({"completion": "a"}, {}, 400, "sequences[0].messages"),
        ({"messages": [], "completion": "a"}, {}, 400, "sequences[0].messages"),
        ({"messages": MESSAGES, "completion": "a"}, {"top_k": 10**6}, 400, "top_k"),
        ({"messages": MESSAGES, "completion": "a"}, {"temperature": 0}, 400, "temperature"),
        ({"messages": MESSAGES, "completion": "word " * 300}, {}, 413, "sequences[0]"),
        ({"messages": MESSAGES, "completion": "a"}, {"model": "nope"}, 404, "model"),
        ({"messages": MESSAGES, "completion": 5}, {}, 422, None),
        ({"messages": MESSAGES, "completion": "a", "typo": 1}, {}, 422, None),
    ],
)
def test_errors_name_the_field_and_the_service_keeps_serving(service, sequence, extra, status, field):
    r = post(service, {"model": "gemma", "sequences": [sequence], **extra})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    if field is not None:
        assert error["param"] == field, error
    ok = post(service, {"model": "gemma", "sequences": [{"prompt": "a", "completion": "b"}]})
    assert ok.status_code == 200, ok.text


def test_grpc_errors_carry_the_field(service):
    from opd_client.errors import InvalidRequest

    with (
        GrpcTeacherClient(service.grpc_target, api_key=service.api_key) as client,
        pytest.raises(InvalidRequest) as info,
    ):
        client.score_text({"model": "gemma", "sequences": [{"messages": MESSAGES, "completion": ""}]})
    assert info.value.field == "sequences[0].completion"
