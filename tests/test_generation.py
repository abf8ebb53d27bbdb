"""Generation on the OpenAI-compatible endpoints: the sampler at extreme parameters, the 400s for parameters it
cannot honour, and generation that leaves room for scoring.

- The sampler (backends.generate.sample_next) keeps each row's most likely token under every filter, so any
  valid parameters leave something to draw: degenerate values (top_p = 1e-300, temperature = 1e-300,
  top_k = 1, min_p = 1) must give exactly the argmax, never NaN. The rows are built so the argmax is unique
  with a gap of at least 1e-3 nats, which makes "exactly the argmax" exact arithmetic, not a likely draw:
  at temperature 1e-6 the runner-up's weight is exp(-1e3), 0 in float64.
- Out-of-range parameters get a 400 naming the field and the limit (docs/api.md "Errors").
- A long generation hands the forward thread one decode step at a time, so score requests sent while it runs
  are answered before it ends (the order of answers is asserted, not their latency; the latency is measured
  by `opd bench generation-latency`, docs/serving.md).
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch

from opd_teacher.backends.generate import SamplingParams, sample_next

DEFAULT = "smollm2-135m-instruct"
VOCAB = 49152


def _rows(n: int = 16, seed: int = 0) -> torch.Tensor:
    """Log-softmax rows [n, VOCAB] with a unique argmax >= 1e-3 nats above the rest and some -inf entries
    (masked padding rows of a head)."""
    g = torch.Generator().manual_seed(seed)
    logits_N_V = torch.randn(n, VOCAB, generator=g) * 3
    best_N = torch.randint(0, VOCAB, (n,), generator=g)
    logits_N_V[torch.arange(n), best_N] = logits_N_V.max(dim=-1).values + 1e-3 + torch.rand(n, generator=g)
    logits_N_V[:, -100:] = float("-inf")
    return logits_N_V.log_softmax(dim=-1)


def _draw(logprobs_N_V: torch.Tensor, draws: int = 8, **params) -> torch.Tensor:
    """[draws, n] tokens drawn with these parameters (a fixed seed)."""
    generator = torch.Generator().manual_seed(1)
    sampling = SamplingParams(max_tokens=1, **params)
    return torch.stack([sample_next(logprobs_N_V, sampling, generator) for _ in range(draws)])


@pytest.mark.parametrize(
    "params",
    [
        {"top_p": 1e-300},
        {"top_p": 4.08e-249, "top_k": 253},  # the fuzzer's case that answered 500 (float32 rounded it to 0)
        {"top_p": 5e-324},  # the smallest float64 above 0
        {"temperature": 1e-6},
        {"temperature": 1e-300},
        {"temperature": 5e-324, "top_p": 0.5},
        {"top_k": 1},
        {"top_k": 1, "temperature": 1e300},
        {"min_p": 1.0},
        {"temperature": 0.0, "top_p": 1e-300, "min_p": 1.0},
    ],
)
def test_degenerate_parameters_draw_the_most_likely_token(params):
    logprobs_N_V = _rows()
    drawn_D_N = _draw(logprobs_N_V, **params)
    assert torch.equal(drawn_D_N, logprobs_N_V.argmax(dim=-1).expand_as(drawn_D_N)), params


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1e300},  # every finite token equally likely
        {"temperature": 1e300, "top_p": 0.999999, "min_p": 1e-300},
        {"temperature": 1e-3, "top_p": 0.9, "top_k": 50_000},  # top_k beyond the vocabulary: no cut
    ],
)
def test_extreme_but_valid_parameters_draw_real_tokens(params):
    logprobs_N_V = _rows()
    drawn_D_N = _draw(logprobs_N_V, **params)
    assert drawn_D_N.min() >= 0 and drawn_D_N.max() < VOCAB
    assert torch.isfinite(logprobs_N_V.gather(1, drawn_D_N.T)).all()  # never a -inf (masked) token
    if params["temperature"] == 1e300:  # flat: 8 draws of 16 rows out of ~49k tokens are not all the argmax
        assert not torch.equal(drawn_D_N, logprobs_N_V.argmax(dim=-1).expand_as(drawn_D_N))


# ---- through the service ---------------------------------------------------------------------------


def _post(teacher, path: str, body: dict | str) -> httpx.Response:
    """POST JSON (a str is sent as is: NaN and integers beyond float range, which json.dumps cannot make)."""
    headers = {"Authorization": f"Bearer {teacher.api_key}", "Content-Type": "application/json"}
    content = body if isinstance(body, str) else None
    return httpx.post(
        f"{teacher.http_url}{path}",
        json=None if content is not None else body,
        content=content,
        headers=headers,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("fields", "param", "limit"),
    [
        ('"top_p": 0', "top_p", "(0, 1]"),
        ('"top_p": -1e-300', "top_p", "(0, 1]"),
        ('"top_p": 1.0000001', "top_p", "(0, 1]"),
        ('"top_p": NaN', "top_p", "(0, 1]"),
        ('"top_p": 1' + "0" * 400, "top_p", "(0, 1]"),  # an integer float() cannot hold
        ('"temperature": -0.5', "temperature", ">= 0"),
        ('"temperature": Infinity', "temperature", "finite"),
        ('"temperature": NaN', "temperature", "finite"),
        ('"temperature": -1' + "0" * 400, "temperature", ">= 0"),
        ('"top_k": -2', "top_k", ">= 1, or 0 / -1"),
        ('"min_p": -0.01', "min_p", "[0, 1]"),
        ('"min_p": 1.5', "min_p", "[0, 1]"),
        ('"min_p": NaN', "min_p", "[0, 1]"),
        ('"n": 0', "n", "[1, 128]"),
        ('"n": 129', "n", "[1, 128]"),
        ('"max_tokens": 65', "max_tokens", "max_generation_tokens = 64"),
        ('"max_tokens": -1', "max_tokens", ">= 0"),
    ],
)
def test_out_of_range_sampling_parameters_are_a_400_naming_the_field(small_teacher, fields, param, limit):
    r = _post(small_teacher, "/v1/completions", '{"model": "tiny", "prompt": "Hello", ' + fields + "}")
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert limit in error["message"], error


def test_chat_generation_is_bounded_by_max_generation_tokens(small_teacher):
    messages = [{"role": "user", "content": "Tell me a story."}]
    for field in ("max_tokens", "max_completion_tokens"):
        r = _post(small_teacher, "/v1/chat/completions", {"model": "tiny", "messages": messages, field: 65})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert "max_generation_tokens = 64" in r.json()["error"]["message"]
    # without max_tokens the chat default is as much as fits, capped by the limit: 64 tokens, not ~4000
    body = {"model": "tiny", "messages": messages, "ignore_eos": True, "temperature": 0}
    r = _post(small_teacher, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 64
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_a_degenerate_nucleus_is_greedy_and_the_service_stays_up(small_teacher):
    """The fuzzer's 500: top_p = 4.08e-249, top_k = 253, four text prompts. Now the greedy answer."""
    prompts = ["Hello", "The cat", "1 2 3", "Once upon a time"]
    base = {"model": "tiny", "prompt": prompts, "max_tokens": 8, "return_token_ids": True, "ignore_eos": True}
    greedy = _post(small_teacher, "/v1/completions", {**base, "temperature": 0})
    assert greedy.status_code == 200, greedy.text
    for extreme in (
        {"top_p": 4.08e-249, "top_k": 253},
        {"temperature": 1e-300},
        {"temperature": 5e-324, "top_p": 5e-324},
        {"top_k": 1, "seed": 3},
        {"min_p": 1.0, "n": 2},
    ):
        r = _post(small_teacher, "/v1/completions", {**base, **extreme})
        assert r.status_code == 200, (extreme, r.text)
        want = [c["token_ids"] for c in greedy.json()["choices"]]
        got = [c["token_ids"] for c in r.json()["choices"]]
        n = extreme.get("n", 1)
        assert got == [ids for ids in want for _ in range(n)], extreme
    assert httpx.get(f"{small_teacher.http_url}/health/ready", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def small_teacher(tmp_path_factory, tiny_model_dir):
    """The tiny model alone, with a small --max-generation-tokens (64) so its limits are cheap to reach."""
    from helpers import start_teacher

    proc = start_teacher(
        tmp_path_factory.mktemp("gen-teacher"),
        models=[f"tiny={tiny_model_dir}"],
        extra_args=["--max-generation-tokens", "64"],
    )
    yield proc
    proc.stop()


# ---- generation does not starve scoring ------------------------------------------------------------


def _generated_tokens(teacher, model: str) -> float:
    text = httpx.get(f"{teacher.http_url}/metrics", headers=_auth(teacher), timeout=10).text
    prefix = f'opd_generated_tokens_total{{model="{model}"}} '
    return next((float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


def _auth(teacher) -> dict:
    return {"Authorization": f"Bearer {teacher.api_key}"}


def test_score_requests_are_answered_while_a_512_token_generation_runs(teacher):
    """Answers arrive in this order: every score request (sent once the generation decodes) before the
    generation. When generation held the forward thread for its whole decode, they all came after it.

    Generation and scoring share one forward thread, so a queued score batch runs before the next decode
    step: the only race is a score request reaching the queue before the remaining ~500 steps are done.
    """
    answered: list[str] = []
    lock = threading.Lock()
    failures: list[str] = []
    before = _generated_tokens(teacher, "tiny")
    at_answer: list[float] = []  # tokens generated when each score was answered (for the failure message)

    def generate():
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 512, "ignore_eos": True}
        r = _post(teacher, "/v1/completions", {**body, "temperature": 0})
        if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != 512:
            failures.append(f"generation: {r.status_code} {r.text[:300]}")
        with lock:
            answered.append("generation")

    def score(client: int):
        for i in range(2):
            ids = [1 + (7919 * (client * 10 + i + k)) % 40000 for k in range(64)]
            body = {"model": "tiny", "sequences": [{"token_ids": ids, "prompt_len": 16}], "top_k": 8}
            r = _post(teacher, "/v1/score", body)
            if r.status_code != 200:
                failures.append(f"score: {r.status_code} {r.text[:300]}")
            with lock:
                answered.append("score")
            at_answer.append(_generated_tokens(teacher, "tiny") - before)

    generation = threading.Thread(target=generate)
    generation.start()
    for _ in range(6000):  # until the generation has drawn its first token (at most 60 s)
        if _generated_tokens(teacher, "tiny") > before or not generation.is_alive():
            break
        time.sleep(0.01)
    scorers = [threading.Thread(target=score, args=(c,)) for c in range(4)]
    for t in scorers:
        t.start()
    for t in [*scorers, generation]:
        t.join(timeout=300)
    assert not failures, failures
    assert answered == ["score"] * 8 + ["generation"], (answered, at_answer)
    assert _generated_tokens(teacher, "tiny") - before == 512
    print("tokens generated when each score was answered:", at_answer)
