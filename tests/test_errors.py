"""Bad input gets a clear error (status, field, limit) and the service keeps serving."""

from __future__ import annotations

import json
import random

import httpx
import pytest

VALID = {"sequences": [{"token_ids": [1, 4093, 198, 6004, 2], "prompt_len": 3}], "top_k": 5}


def post(teacher, path: str, body, key: str | None = "default", raw: bytes | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {teacher.api_key if key == 'default' else key}"
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{teacher.http_url}{path}", content=content, headers=headers, timeout=60)


def seq(ids, prompt_len, **extra):
    return {"token_ids": ids, "prompt_len": prompt_len, **extra}


# (case id, request body, HTTP status, words the message must contain: the field and the limit)
CASES = [
    (
        "id >= vocab",
        {"sequences": [seq([1, 2, 49152], 1)], "top_k": 5},
        400,
        ["sequences[0].token_ids[2]", "49152", "[0, 49152)"],
    ),
    (
        "negative id",
        {"sequences": [seq([1, -3, 5], 1)], "top_k": 5},
        400,
        ["sequences[0].token_ids[1]", "-3"],
    ),
    (
        "prompt_len = len",
        {"sequences": [seq([1, 2, 3, 4], 4)], "top_k": 5},
        400,
        ["sequences[0].prompt_len", "[0, 4)"],
    ),
    ("negative prompt_len", {"sequences": [seq([1, 2], -1)], "top_k": 5}, 400, ["prompt_len", "[0, 2)"]),
    (
        "empty sequence",
        {"sequences": [seq([1, 2], 1), seq([], 0)], "top_k": 5},
        400,
        ["sequences[1].token_ids", "at least 1"],
    ),
    ("no sequences", {"sequences": [], "top_k": 5}, 400, ["sequences", "at least 1"]),
    ("top_k 0", {**VALID, "top_k": 0}, 400, ["top_k", "[1, 49152]"]),
    ("top_k negative", {**VALID, "top_k": -2}, 400, ["top_k", "[1, 49152]"]),
    ("top_k above max", {**VALID, "top_k": 49153}, 400, ["top_k", "49152"]),
    ("temperature 0", {**VALID, "temperature": 0}, 400, ["temperature", "> 0"]),
    (
        "bad prefix id",
        {"sequences": [seq([1, 2, 3], 1, teacher_prefix_ids=[1, 99999])], "top_k": 5},
        400,
        ["sequences[0].teacher_prefix_ids[1]", "49152"],
    ),
    (
        "score_ids rows",
        {**VALID, "score_ids": [[[1]]]},
        400,
        ["score_ids[0]", "2 = len(token_ids) - prompt_len"],
    ),
    ("score_ids ragged", {**VALID, "score_ids": [[[1], [1, 2]]]}, 400, ["score_ids[0]", "same length"]),
    ("score_ids id", {**VALID, "score_ids": [[[1], [50000]]]}, 400, ["score_ids[0][1][0]", "49152"]),
    (
        "too many tokens",
        {"sequences": [seq([5] * 6000, 10)] * 3, "top_k": 5},
        413,
        ["18000", "max_tokens = 16384"],
    ),
    (
        "sequence too long",
        {"sequences": [seq([5] * 9000, 10)], "top_k": 5},
        413,
        ["sequences[0]", "max_sequence_len = 8192"],
    ),
    ("unknown model", {**VALID, "model": "gpt-9"}, 404, ["gpt-9", "smollm2-135m-instruct", "tiny"]),
    (
        "id as string",
        {"sequences": [seq([1, "2"], 1)], "top_k": 5},
        422,
        ["sequences[0].token_ids[1]", "integer"],
    ),
    (
        "id as float",
        {"sequences": [seq([1, 2.5], 1)], "top_k": 5},
        422,
        ["sequences[0].token_ids[1]", "integer"],
    ),
    ("top_k as string", {**VALID, "top_k": "5"}, 422, ["top_k", "integer"]),
    ("sequences not a list", {"sequences": {"token_ids": [1]}, "top_k": 5}, 422, ["sequences", "list"]),
    ("missing top_k", {"sequences": VALID["sequences"]}, 422, ["top_k", "required"]),
    ("unknown field", {**VALID, "topk": 5}, 422, ["topk", "not permitted"]),
    ("bad format", {**VALID, "format": "xml"}, 422, ["format", "json", "binary"]),
]


@pytest.mark.parametrize("body,status,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_score_request(teacher, body, status, words):
    r = post(teacher, "/v1/score", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    for word in words:
        assert word in error["message"], (word, error["message"])
    assert error["code"] == status and error["param"]


def test_malformed_json_is_400(teacher):
    r = post(teacher, "/v1/score", None, raw=b'{"sequences": [{"token_ids": [1, 2], "prompt_len": 1}')
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]


def test_form_content_type_is_explained(teacher):
    r = httpx.post(
        f"{teacher.http_url}/v1/score",
        content=json.dumps(VALID),
        headers={
            "Authorization": f"Bearer {teacher.api_key}",
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]


@pytest.mark.parametrize("key,words", [(None, "missing Authorization"), ("nope", "wrong API key")])
def test_auth_required_except_health(teacher, key, words):
    for path, method in (
        ("/v1/score", "post"),
        ("/v1/models", "get"),
        ("/v1/tokenize", "post"),
        ("/v1/completions", "post"),
        ("/v1/chat/completions", "post"),
        ("/docs", "get"),
    ):
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        r = httpx.request(method, f"{teacher.http_url}{path}", json=VALID, headers=headers)
        assert r.status_code == 401, (path, r.status_code)
        assert words in r.json()["error"]["message"]
        assert r.headers["WWW-Authenticate"] == "Bearer"
    # open: health checks (kubelets, vLLM/TRL, KServe v2) and Prometheus scrapes hold no key
    for path in (
        "/health/live",
        "/health/ready",
        "/health",
        "/v2/health/live",
        "/v2/health/ready",
        "/metrics",
    ):
        assert httpx.get(f"{teacher.http_url}{path}").status_code == 200, path


def test_tokenize_errors(teacher):
    both = post(teacher, "/v1/tokenize", {"text": "a", "messages": [{"role": "user", "content": "b"}]})
    assert both.status_code == 400 and "exactly one of text or messages" in both.json()["error"]["message"]
    neither = post(teacher, "/v1/tokenize", {})
    assert neither.status_code == 400
    bad_role = post(teacher, "/v1/tokenize", {"messages": [{"role": "user"}]})
    assert bad_role.status_code == 422 and "messages[0].content" in bad_role.json()["error"]["message"]


def _mutations(rng: random.Random):
    """Randomly broken variants of a valid request: wrong types, bad values, cut bytes, junk."""
    junk_values = [None, -1, 0, 10**12, -(10**12), 1.5, "x", "", [], {}, [[]], [None], True, 49152, [-5]]
    for _ in range(150):
        body = json.loads(json.dumps({**VALID, "score_ids": [[[1, 2], [3, 4]]], "temperature": 1.0}))
        kind = rng.randrange(6)
        if kind == 0:
            body[rng.choice(list(body))] = rng.choice(junk_values)
        elif kind == 1:
            body["sequences"][0][rng.choice(["token_ids", "prompt_len"])] = rng.choice(junk_values)
        elif kind == 2:
            ids = body["sequences"][0]["token_ids"]
            ids[rng.randrange(len(ids))] = rng.choice(junk_values)
        elif kind == 3:
            del body[rng.choice(list(body))]
        elif kind == 4:
            raw = json.dumps(body).encode()
            yield raw[: rng.randrange(len(raw))]
            continue
        else:
            yield bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
            continue
        yield json.dumps(body).encode()


def test_random_malformed_payloads_then_valid(teacher):
    rng = random.Random(1234)
    statuses = {}
    for raw in _mutations(rng):
        r = post(teacher, "/v1/score", None, raw=raw)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (raw, r.status_code, r.text)
        if r.status_code != 200:
            assert r.json()["error"]["message"]
    assert statuses.get(400, 0) + statuses.get(422, 0) > 100, statuses
    r = post(teacher, "/v1/score", VALID)
    assert r.status_code == 200 and len(r.json()["sequences"][0]["top_ids"]) == 2
    assert teacher.process.poll() is None
