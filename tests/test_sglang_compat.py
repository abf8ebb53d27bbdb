"""SGLang's native `POST /generate` against the real service, checked against /v1/score on the same tokens.

The request and answer shapes are SGLang v0.5.23's (the PyPI wheel sglang==0.5.23; files named in
opd_teacher/http/sglang_request.py and sglang_shape.py). Both routes run the same batcher and forward, so
the numbers agree up to float rounding of differently batched forwards: TOL = 1e-5 (the issue's bound).
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from transformers import AutoTokenizer

from helpers import post_score
from opd_client.convert import score_result_from_json
from opd_common.embedded import embedded_teacher_dir

TOL = 1e-5
IDS = [1, 504, 3575, 282, 4649, 314, 7042, 30, 504, 3575]  # the tiny model: some tokens top-1, some deep
NAMED = [17, 905, 3575, 42000]  # token_ids_logprob


@pytest.fixture(scope="module")
def http(teacher):
    headers = {"Authorization": f"Bearer {teacher.api_key}"}
    with httpx.Client(base_url=teacher.http_url, headers=headers, timeout=120) as client:
        yield client


def generate(http, body: dict, status: int = 200):
    r = http.post("/generate", json=body)
    assert r.status_code == status, r.text
    return r.json()


def score(teacher, token_ids: list[int], prompt_len: int, top_k: int, model: str = "tiny", **extra):
    body = {"model": model, "sequences": [{"token_ids": token_ids, "prompt_len": prompt_len}], "top_k": top_k}
    (seq,) = score_result_from_json(post_score(teacher, {**body, **extra})).sequences
    return seq


def entries(rows) -> tuple[np.ndarray, np.ndarray]:
    """[[logprob, id, text], ...] -> (logprobs, ids)."""
    return np.array([r[0] for r in rows], dtype=np.float64), np.array([r[1] for r in rows])


def test_input_logprobs_top_k_and_named_ids_equal_v1_score(teacher, http):
    out = generate(
        http,
        {
            "model": "tiny",
            "input_ids": IDS,
            "sampling_params": {"max_new_tokens": 0},
            "return_logprob": True,
            "logprob_start_len": 0,
            "top_logprobs_num": 5,
            "token_ids_logprob": NAMED,
        },
    )
    meta = out["meta_info"]
    assert out["output_ids"] == [] and out["text"] == ""
    assert meta["finish_reason"] == {"type": "length", "length": 0}
    assert (meta["prompt_tokens"], meta["completion_tokens"]) == (len(IDS), 0)
    want = score(teacher, IDS, 1, 5, score_ids=[[NAMED] * (len(IDS) - 1)])

    tokens = meta["input_token_logprobs"]
    assert len(tokens) == len(IDS) and tokens[0] == [None, IDS[0], None]  # SGLang: the first has no logprob
    lps, ids = entries(tokens[1:])
    assert ids.tolist() == IDS[1:]
    assert np.max(np.abs(lps - want.token_logprobs_T)) <= TOL

    top = meta["input_top_logprobs"]
    assert len(top) == len(IDS) and top[0] is None
    for t, row in enumerate(top[1:]):
        lps, ids = entries(row)
        np.testing.assert_array_equal(ids, want.top_ids_T_K[t])
        assert np.max(np.abs(lps - want.top_logprobs_T_K[t])) <= TOL
        assert list(lps) == sorted(lps, reverse=True)

    named = meta["input_token_ids_logprobs"]
    assert len(named) == len(IDS) and named[0] is None
    for t, row in enumerate(named[1:]):
        lps, ids = entries(row)
        assert ids.tolist() == NAMED
        assert np.max(np.abs(lps - want.score_logprobs_T_M[t])) <= TOL
    assert meta["output_token_logprobs"] == [] and meta["output_top_logprobs"] == []


@pytest.mark.parametrize("start", [4, len(IDS) - 1, len(IDS), -1])
def test_logprob_start_len_selects_the_input_tokens_as_sglang(teacher, http, start):
    body = {
        "model": "tiny",
        "input_ids": IDS,
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True,
    }
    meta = generate(http, {**body, "logprob_start_len": start, "top_logprobs_num": 2})["meta_info"]
    s = len(IDS) if start == -1 else start
    tokens, top = meta["input_token_logprobs"], meta["input_top_logprobs"]
    if s == len(IDS):  # -1 (the default) and len(input_ids): no input entries
        assert tokens == [] and top == []
        return
    assert len(tokens) == len(IDS) - s and tokens[0] == [None, IDS[s], None] and top[0] is None
    want = score(teacher, IDS, s + 1, 2) if s + 1 < len(IDS) else None
    if want is not None:
        lps, ids = entries(tokens[1:])
        assert ids.tolist() == IDS[s + 1 :]
        assert np.max(np.abs(lps - want.token_logprobs_T)) <= TOL


def test_default_teacher_and_text_input(teacher, http):
    tokenizer = AutoTokenizer.from_pretrained(embedded_teacher_dir())
    text = "The capital of France is Paris."
    ids = tokenizer(text)["input_ids"]
    body = {"text": text, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True}
    out = generate(http, {**body, "logprob_start_len": 0, "return_prompt_token_ids": True})
    assert out["prompt_token_ids"] == ids  # tokenized as SGLang does: the tokenizer's special tokens
    want = score(teacher, ids, 1, 1, model="smollm2-135m-instruct")  # no model: the first --model
    lps, _ = entries(out["meta_info"]["input_token_logprobs"][1:])
    assert np.max(np.abs(lps - want.token_logprobs_T)) <= TOL


def test_a_batch_answers_a_list_with_per_prompt_settings(http):
    short = IDS[:4]
    batch = {
        "input_ids": [IDS, short],
        "sampling_params": [{"max_new_tokens": 0}, {"max_new_tokens": 0}],
        "return_logprob": [True, True],
        "logprob_start_len": [0, 1],
        "top_logprobs_num": [3, 0],
        "token_ids_logprob": [NAMED, [5]],
        "rid": ["a", "b"],
    }
    r = http.post("/generate?model=tiny", json=batch)  # opd's addition: the teacher by name in the URL
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out, list) and [o["meta_info"]["id"] for o in out] == ["a", "b"]
    first, second = (o["meta_info"] for o in out)
    assert len(first["input_top_logprobs"][1]) == 3 and "input_top_logprobs" not in second
    assert len(second["input_token_logprobs"]) == len(short) - 1
    assert [e[1] for e in second["input_token_ids_logprobs"][1]] == [5]
    alone = generate(
        http,
        {
            "model": "tiny",
            "input_ids": short,
            "return_logprob": True,
            "logprob_start_len": 1,
            "sampling_params": {"max_new_tokens": 0},
        },
    )["meta_info"]
    a, _ = entries(second["input_token_logprobs"][1:])
    b, _ = entries(alone["input_token_logprobs"][1:])
    assert np.max(np.abs(a - b)) <= TOL


def test_hidden_states_are_the_rows_v1_score_returns(teacher, http):
    out = generate(
        http,
        {
            "model": "tiny",
            "input_ids": IDS,
            "sampling_params": {"max_new_tokens": 0},
            "return_hidden_states": True,
        },
    )
    (rows,) = out["meta_info"]["hidden_states"]  # one prefill block, no decode steps
    rows_L_D = np.array(rows)
    assert rows_L_D.shape == (len(IDS), 128)  # every input position, the last included
    # /v1/score's row j is the position predicting completion token j: score IDS + one more token from 1
    want = score(teacher, IDS + [IDS[0]], 1, 1, return_hidden=True, hidden_dtype="float32")
    assert np.max(np.abs(rows_L_D - want.hidden_T_D)) <= TOL
    plain = score(teacher, IDS, 1, 1, return_hidden=True, hidden_dtype="float32")
    assert np.max(np.abs(rows_L_D[:-1] - plain.hidden_T_D)) <= TOL


def test_generated_tokens_and_their_logprobs(teacher, http):
    body = {
        "model": "tiny",
        "input_ids": IDS[:5],
        "sampling_params": {"max_new_tokens": 4, "temperature": 0},
        "return_logprob": True,
        "top_logprobs_num": 2,
        "return_hidden_states": True,
    }
    out = generate(http, body)
    meta, new = out["meta_info"], out["output_ids"]
    assert len(new) == 4 and meta["finish_reason"] == {"type": "length", "length": 4}
    assert meta["input_token_logprobs"] == []  # logprob_start_len -1: outputs only
    want = score(teacher, IDS[:5] + new, 5, 2)
    lps, ids = entries(meta["output_token_logprobs"])
    assert ids.tolist() == new and np.max(np.abs(lps - want.token_logprobs_T)) <= TOL
    assert [e[1] for e in meta["output_top_logprobs"][0]] == want.top_ids_T_K[0].tolist()
    assert new[0] == int(want.top_ids_T_K[0, 0])  # greedy
    hidden = meta["hidden_states"]  # the prefill block, then one row per decode step (3 for 4 tokens)
    assert len(hidden) == 4 and np.array(hidden[0]).shape == (5, 128) and len(hidden[1]) == 128


def test_text_in_logprobs(http):
    tokenizer = AutoTokenizer.from_pretrained(embedded_teacher_dir())  # the tiny model shares it
    body = {"model": "tiny", "input_ids": IDS[:4], "return_logprob": True, "logprob_start_len": 0}
    meta = generate(http, {**body, "sampling_params": {"max_new_tokens": 0}, "return_text_in_logprobs": True})
    texts = [e[2] for e in meta["meta_info"]["input_token_logprobs"]]
    assert texts[0] is None and texts[1:] == [tokenizer.decode([i]) for i in IDS[1:4]]


BAD = [
    ({"input_ids": [[1, 2], [3, 49152]]}, "input_ids[1][1]"),
    ({"input_ids": []}, "input_ids"),
    ({"input_ids": IDS, "text": "hi"}, "input_ids"),
    ({"input_ids": IDS, "return_logprob": True, "top_logprobs_num": 10**6}, "top_logprobs_num"),
    ({"input_ids": IDS, "return_logprob": True, "logprob_start_len": 99}, "logprob_start_len"),
    ({"input_ids": IDS, "return_logprob": True, "token_ids_logprob": [3, -1]}, "token_ids_logprob[1]"),
    ({"input_ids": IDS, "sampling_params": {"max_new_tokens": -1}}, "sampling_params.max_new_tokens"),
    ({"input_ids": IDS, "sampling_params": {"top_p": 0}}, "sampling_params.top_p"),
    ({"input_ids": IDS, "sampling_params": {"regex": "a+"}}, "sampling_params.regex"),
    ({"input_ids": IDS, "sampling_params": {"temprature": 1}}, "sampling_params.temprature"),
    ({"input_ids": IDS, "stream": True}, "stream"),
    ({"input_ids": IDS, "image_data": ["x.png"]}, "image_data"),
    ({"input_ids": IDS, "return_logprob": "yes"}, "return_logprob"),
    ({"input_ids": [IDS, IDS], "logprob_start_len": [0]}, "logprob_start_len"),
    ({"input_ids": IDS, "topk": 3}, "topk"),
]


@pytest.mark.parametrize("body, field", BAD)
def test_bad_input_gets_an_sglang_error_naming_the_field_and_the_service_goes_on(http, body, field):
    r = http.post("/generate", json={"model": "tiny", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]  # SGLang's shape: {"error": {"message": ...}}; opd adds param and code
    assert error["param"] == field and field.split("[")[0].split(".")[-1] in error["message"]
    assert error["code"] == 400
    ok = generate(http, {"model": "tiny", "input_ids": IDS[:3], "sampling_params": {"max_new_tokens": 0}})
    assert ok["meta_info"]["prompt_tokens"] == 3


def test_malformed_json_unknown_model_missing_key(teacher, http):
    r = http.post("/generate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = http.post("/generate", json={"model": "nope", "input_ids": IDS})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = httpx.post(f"{teacher.http_url}/generate", json={"input_ids": IDS})
    assert r.status_code == 401
    assert httpx.get(f"{teacher.http_url}/health_generate").status_code == 200  # no key, like /health
