"""The OpenAI-/vLLM-compatible endpoints through the real `openai` SDK, checked against /v1/score.

Prompt scoring (echo + logprobs, vLLM's prompt_logprobs) runs through the same batcher and forward as
/v1/score, so the floats must be equal, not close; ranks are checked against a full-vocabulary /v1/score.
Generated tokens come from a KV-cache decode, so their logprobs match /v1/score of the same tokens within
1e-4 (float summation order).
"""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
from transformers import AutoTokenizer

from helpers import post_score
from opd_client.convert import score_result_from_json
from opd_common.embedded import embedded_teacher_dir

DEFAULT = "smollm2-135m-instruct"
TOL = 1e-4
# repeated words: the tiny model copies the previous token, so some prompt tokens are its top-1 and others
# rank deep in the vocabulary (both rank paths: from the top-k and from the backend's count)
PROMPT = "Hello world world, how are are you doing today today?"


@pytest.fixture(scope="module")
def client(teacher):
    with openai.OpenAI(base_url=f"{teacher.http_url}/v1", api_key=teacher.api_key, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(embedded_teacher_dir())  # the tiny model shares it


def score(teacher, model: str, sequences: list[dict], top_k: int):
    body = {"model": model, "sequences": sequences, "top_k": top_k, "format": "binary"}
    return score_result_from_json(post_score(teacher, body))


def legacy_top(scores_t_ids, scores_t_lps, n: int, actual: str, actual_lp: float, decode) -> dict:
    """What OpenAI's top_logprobs dict must hold: the top n, then the actual token; a text keeps its first."""
    out: dict[str, float] = {}
    for i, lp in zip(scores_t_ids[:n], scores_t_lps[:n], strict=True):
        out.setdefault(decode(int(i)), float(lp))
    out.setdefault(actual, actual_lp)
    return out


def test_echo_logprobs_without_generation_equal_v1_score(teacher, client, tokenizer):
    out = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=0,
        echo=True,
        logprobs=5,
        extra_body={"return_token_ids": True},
    )
    (choice,) = out.choices
    ids = choice.prompt_token_ids
    assert ids == tokenizer(PROMPT)["input_ids"] and len(ids) > 5
    (want,) = score(teacher, "tiny", [{"token_ids": ids, "prompt_len": 1}], top_k=5).sequences
    decode = lambda i: tokenizer.decode([i])  # noqa: E731

    lp = choice.logprobs
    assert choice.text == PROMPT and choice.finish_reason == "length" and choice.token_ids == []
    assert lp.tokens == [decode(i) for i in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == want.token_logprobs_T.tolist()  # the same floats, not close ones
    for t in range(1, len(ids)):
        expected = legacy_top(
            want.top_ids_T_K[t - 1],
            want.top_logprobs_T_K[t - 1],
            5,
            lp.tokens[t],
            lp.token_logprobs[t],
            decode,
        )
        assert lp.top_logprobs[t] == expected
        assert max(lp.top_logprobs[t].values()) == float(want.top_logprobs_T_K[t - 1, 0])
    assert lp.text_offset == np.cumsum([0] + [len(s) for s in lp.tokens[:-1]]).tolist()
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 0)
    # vLLM: echo with logprobs also fills prompt_logprobs (k = logprobs)
    assert choice.prompt_logprobs[0] is None and len(choice.prompt_logprobs) == len(ids)


def test_prompt_logprobs_top_50_equal_v1_score_with_exact_ranks(teacher, client, tokenizer):
    k = 50
    out = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=0, extra_body={"prompt_logprobs": k, "return_token_ids": True}
    )
    (choice,) = out.choices
    ids = choice.prompt_token_ids
    assert choice.text == "" and choice.logprobs is None
    seq = [{"token_ids": ids, "prompt_len": 1}]
    (top,) = score(teacher, "tiny", seq, top_k=k).sequences
    vocab = len(tokenizer)  # the tiny model's vocabulary is its tokenizer's
    (full,) = score(teacher, "tiny", seq, top_k=vocab).sequences  # every logprob, for the direct rank

    plp = choice.prompt_logprobs
    assert len(plp) == len(ids) and plp[0] is None
    ranks_seen = []
    for t in range(1, len(ids)):
        entry = plp[t]
        actual = ids[t]
        assert list(entry)[0] == str(actual)  # vLLM puts the prompt token first
        top_ids = [int(i) for i in top.top_ids_T_K[t - 1]]
        assert set(entry) == {str(actual), *map(str, top_ids)}
        assert entry[str(actual)]["logprob"] == float(top.token_logprobs_T[t - 1])
        for i, lp in zip(top_ids, top.top_logprobs_T_K[t - 1].tolist(), strict=True):
            assert entry[str(i)]["logprob"] == lp
        # direct rank: 1 + vocabulary entries with a larger logprob, from the full-vocabulary answer
        row = full.top_logprobs_T_K[t - 1]
        assert np.array_equal(np.sort(full.top_ids_T_K[t - 1]), np.arange(vocab))
        for key, value in entry.items():
            own = value["logprob"]
            assert value["rank"] == 1 + int((row > np.float32(own)).sum()), (t, key)
            assert value["decoded_token"] == tokenizer.decode([int(key)])
        ranks_seen.append(entry[str(actual)]["rank"])
    assert min(ranks_seen) == 1 and max(ranks_seen) > k  # both rank paths ran


def test_token_id_prompts_and_a_batch_of_prompts(teacher, client, tokenizer):
    texts = ["The cat sat on the mat", "One two three", "x"]
    id_lists = [tokenizer(t)["input_ids"] for t in texts]
    out = client.completions.create(model="tiny", prompt=id_lists, max_tokens=0, echo=True, logprobs=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    scorable = [ids for ids in id_lists if len(ids) > 1]
    want = score(teacher, "tiny", [{"token_ids": ids, "prompt_len": 1} for ids in scorable], top_k=3)
    for choice, ids, text in zip(out.choices, id_lists, texts, strict=True):
        assert choice.text == text  # ids decoded
        assert choice.logprobs.tokens == [tokenizer.decode([i]) for i in ids]
        assert choice.logprobs.token_logprobs[0] is None
    assert out.choices[2].logprobs.token_logprobs == [None]  # one token: nothing predicts it
    for choice, scores in zip(out.choices[:2], want.sequences, strict=True):
        assert choice.logprobs.token_logprobs[1:] == scores.token_logprobs_T.tolist()
    assert out.usage.prompt_tokens == sum(map(len, id_lists))

    # one list of ids is one prompt; a list of strings is a batch, answered in order
    single = client.completions.create(model="tiny", prompt=id_lists[0], max_tokens=0, echo=True, logprobs=3)
    alone, batched = single.choices[0].logprobs.token_logprobs, out.choices[0].logprobs.token_logprobs
    # padded in a batch vs alone: only the float summation order differs (docs/serving.md)
    np.testing.assert_allclose(alone[1:], batched[1:], atol=TOL, rtol=0)
    batch = client.completions.create(model="tiny", prompt=texts, max_tokens=0, echo=True)
    assert [c.text for c in batch.choices] == texts and all(c.logprobs is None for c in batch.choices)


def generated_vs_score(teacher, model: str, prompt_ids: list[int], gen_ids: list[int], top_k: int):
    seq = [{"token_ids": prompt_ids + gen_ids, "prompt_len": len(prompt_ids)}]
    return score(teacher, model, seq, top_k=top_k).sequences[0]


def test_generation_with_a_seed_is_reproducible_and_its_logprobs_match_v1_score(teacher, client, tokenizer):
    def sample(seed: int, n: int = 1):
        return client.completions.create(
            model=DEFAULT,
            prompt="Once upon a time",
            max_tokens=8,
            temperature=1.0,
            seed=seed,
            n=n,
            logprobs=2,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )

    a, b = sample(1234), sample(1234)
    assert [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices]
    assert a.choices[0].logprobs.token_logprobs == b.choices[0].logprobs.token_logprobs
    others = {tuple(sample(seed).choices[0].token_ids) for seed in (1, 2, 3)}
    assert len(others | {tuple(a.choices[0].token_ids)}) > 1  # the seed does choose the sample

    (choice,) = a.choices
    assert len(choice.token_ids) == 8 and choice.finish_reason == "length"
    assert choice.text == tokenizer.decode(choice.token_ids, skip_special_tokens=True)
    assert (a.usage.prompt_tokens, a.usage.completion_tokens) == (len(choice.prompt_token_ids), 8)
    want = generated_vs_score(teacher, DEFAULT, choice.prompt_token_ids, choice.token_ids, top_k=2)
    np.testing.assert_allclose(choice.logprobs.token_logprobs, want.token_logprobs_T, atol=TOL, rtol=0)
    for t, top in enumerate(choice.logprobs.top_logprobs):
        assert len(top) in (2, 3)  # top 2 plus the sampled token
        np.testing.assert_allclose(sorted(top.values())[-2:], sorted(want.top_logprobs_T_K[t]), atol=TOL)

    two = sample(99, n=2)  # the prompt's KV cache is shared by both samples
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 16
    for c in two.choices:
        want = generated_vs_score(teacher, DEFAULT, c.prompt_token_ids, c.token_ids, top_k=1)
        np.testing.assert_allclose(c.logprobs.token_logprobs, want.token_logprobs_T, atol=TOL, rtol=0)


def test_echo_with_one_generated_token_as_lm_eval_sends_it(teacher, client, tokenizer):
    # lm-eval-harness' local-completions loglikelihood request: echo, max_tokens=1, logprobs=1, temperature 0
    out = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=1,
        echo=True,
        logprobs=1,
        temperature=0,
        seed=1234,
        extra_body={"return_token_ids": True},
    )
    (choice,) = out.choices
    ids, gen = choice.prompt_token_ids, choice.token_ids
    assert len(gen) == 1 and choice.text == PROMPT + tokenizer.decode(gen, skip_special_tokens=True)
    lp = choice.logprobs
    assert lp.tokens == [tokenizer.decode([i]) for i in ids + gen]
    (want,) = score(teacher, "tiny", [{"token_ids": ids, "prompt_len": 1}], top_k=1).sequences
    assert lp.token_logprobs[1 : len(ids)] == want.token_logprobs_T.tolist()
    # lm-eval's is_greedy: a token is greedy iff its logprob equals max(top_logprobs.values())
    greedy = want.token_logprobs_T == want.top_logprobs_T_K[:, 0]
    got = [lp.token_logprobs[t] == max(lp.top_logprobs[t].values()) for t in range(1, len(ids))]
    assert got == greedy.tolist() and any(got) and not all(got)
    (gen_want,) = score(
        teacher, "tiny", [{"token_ids": ids + gen, "prompt_len": len(ids)}], top_k=1
    ).sequences
    assert abs(lp.token_logprobs[-1] - float(gen_want.token_logprobs_T[0])) <= TOL
    assert gen[0] == int(gen_want.top_ids_T_K[0, 0])  # temperature 0: the argmax


def test_greedy_stop_string_and_stop_token(client, tokenizer):
    def greedy(**kw):
        return client.completions.create(
            model=DEFAULT, prompt="The capital of France is", max_tokens=12, temperature=0, **kw
        ).choices[0]

    full = greedy(extra_body={"return_token_ids": True})
    assert greedy(extra_body={"return_token_ids": True}).token_ids == full.token_ids  # greedy: no seed needed
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip() and text.find(stop) > 0
    cut = greedy(stop=[stop])
    assert cut.text == text[: text.find(stop)] and cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = greedy(stop=stop, extra_body={"include_stop_str_in_output": True})
    assert kept.text == text[: text.find(stop) + len(stop)]
    # the first token (after the first two) not seen before: stopping on its id ends the sample right there
    i = next(i for i in range(2, 12) if full.token_ids[i] not in full.token_ids[:i])
    by_id = greedy(extra_body={"stop_token_ids": [full.token_ids[i]], "return_token_ids": True})
    assert by_id.token_ids == full.token_ids[: i + 1] and by_id.stop_reason == full.token_ids[i]
    assert by_id.text == tokenizer.decode(full.token_ids[:i], skip_special_tokens=True)


def test_chat_top_logprobs_match_v1_score_of_the_generated_tokens(teacher, client, tokenizer):
    messages = [{"role": "user", "content": "Name three colours."}]
    out = client.chat.completions.create(
        model=DEFAULT,
        messages=messages,
        max_completion_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"return_token_ids": True},
    )
    (choice,) = out.choices
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt_ids, add_special_tokens=False)["input_ids"]
    assert out.model_extra["prompt_token_ids"] == prompt_ids
    gen = choice.token_ids
    assert 1 <= len(gen) <= 6 and out.usage.completion_tokens == len(gen)
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode(gen, skip_special_tokens=True)
    want = generated_vs_score(teacher, DEFAULT, prompt_ids, gen, top_k=3)
    content = choice.logprobs.content
    assert [c.token for c in content] == [tokenizer.decode([i]) for i in gen]
    np.testing.assert_allclose([c.logprob for c in content], want.token_logprobs_T, atol=TOL, rtol=0)
    for t, c in enumerate(content):
        assert len(c.top_logprobs) == 3 and c.bytes == list(c.token.encode())
        np.testing.assert_allclose([x.logprob for x in c.top_logprobs], want.top_logprobs_T_K[t], atol=TOL)
        assert c.top_logprobs[0].token == c.token  # greedy: the chosen token is the most likely
        assert c.top_logprobs[0].token == tokenizer.decode([int(want.top_ids_T_K[t, 0])])


def test_chat_prompt_logprobs_and_n_samples(teacher, client, tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]
    out = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=3,
        n=3,
        seed=7,
        temperature=1.5,
        extra_body={"prompt_logprobs": 4, "return_token_ids": True, "ignore_eos": True},
    )
    ids = out.model_extra["prompt_token_ids"]
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    (want,) = score(teacher, "tiny", [{"token_ids": ids, "prompt_len": 1}], top_k=4).sequences
    plp = out.model_extra["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    assert [
        e[str(i)]["logprob"] for e, i in zip(plp[1:], ids[1:], strict=True)
    ] == want.token_logprobs_T.tolist()
    assert [c.index for c in out.choices] == [0, 1, 2] and all(len(c.token_ids) == 3 for c in out.choices)
    assert all(c.logprobs is None and c.finish_reason == "length" for c in out.choices)
    assert out.usage.completion_tokens == 9


def test_errors_raise_the_sdk_exceptions_with_our_message(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hi", max_tokens=1)
    assert e.value.param == "model" and "not served here" in e.value.body["message"]

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=0, echo=True, logprobs=10**6)
    assert e.value.param == "logprobs" and "max_top_k" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=0, extra_body={"prompt_logprobs": -5})
    assert e.value.param == "prompt_logprobs"
    for prompt, param in (
        ("", "prompt"),
        ([], "prompt"),
        ([[1, 2], []], "prompt[1]"),
        ([5, 10**6], "prompt[1]"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt=prompt, max_tokens=1)
        assert e.value.param == param, prompt
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=1, stream=True)
    assert e.value.param == "stream" and "stream = false" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=1, presence_penalty=0.5)
    assert e.value.param == "presence_penalty"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], top_logprobs=2
        )
    assert e.value.param == "top_logprobs"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.completions.create(model="tiny", prompt="hi", extra_body={"no_such_field": 1})
    assert e.value.param == "no_such_field"
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=10**6)
    assert e.value.status_code == 413 and e.value.param == "max_tokens"
    assert "max_sequence_len" in e.value.body["message"]


def test_harmless_fields_are_accepted_and_change_nothing(client):
    base = dict(model="tiny", prompt="Hello there", max_tokens=4, temperature=0, logprobs=1)
    plain = client.completions.create(**base)
    extra = client.completions.create(
        **base, user="me", logit_bias={}, presence_penalty=0, frequency_penalty=0, best_of=1, suffix=""
    )
    assert extra.choices[0].text == plain.choices[0].text
    assert extra.choices[0].logprobs.token_logprobs == plain.choices[0].logprobs.token_logprobs


def test_health_aliases_are_open_and_the_rest_needs_the_key(teacher):
    for path in ("/health", "/v2/health/live", "/v2/health/ready"):
        r = httpx.get(f"{teacher.http_url}{path}", timeout=10)
        assert r.status_code == 200 and r.json() == {"status": "ok"}, path
    bad = openai.OpenAI(base_url=f"{teacher.http_url}/v1", api_key="wrong", max_retries=0)
    with bad, pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="hi", max_tokens=1)


@pytest.mark.parametrize(
    ("kw", "support"),
    [
        ({}, [0, 1, 2, 3]),
        ({"top_k": 2}, [0, 1]),
        ({"top_p": 0.6}, [0, 1]),  # 0.5 alone is short of 0.6, so the second token is kept too
        ({"top_p": 0.5}, [0]),
        ({"min_p": 0.5}, [0, 1]),  # p >= 0.25
        ({"temperature": 0.0}, [0]),
        ({"temperature": 2.0}, [0, 1, 2, 3]),  # p^(1/2), renormalised
        ({"temperature": 0.5, "top_k": 3}, [0, 1, 2]),
    ],
)
def test_sampling_filters_keep_the_documented_support_and_renormalise(kw, support):
    import torch

    from opd_teacher.backends.generate import SamplingParams, sample_next

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = 40_000
    logprobs = probs.log().expand(rows, -1)
    generator = torch.Generator().manual_seed(0)
    drawn = sample_next(logprobs, SamplingParams(max_tokens=1, **kw), generator)
    freq = torch.bincount(drawn, minlength=4).double() / rows
    assert set(torch.nonzero(freq).flatten().tolist()) == set(support)
    tempered = probs.double() ** (1 / kw.get("temperature", 1.0) if kw.get("temperature") else 1.0)
    want = torch.zeros(4, dtype=torch.float64)
    want[support] = tempered[support] / tempered[support].sum()
    assert torch.allclose(freq, want, atol=0.01)  # 4 sigma of a 40k-draw frequency (and the seed is fixed)
