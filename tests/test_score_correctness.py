"""The service's scores equal a direct in-process transformers forward of the same weights (fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import post_score
from opd_client.convert import score_result_from_json
from opd_common.embedded import embedded_teacher_dir

TOL = 1e-4  # max abs diff in nats, fp32 (issue 3)


@pytest.fixture(scope="module")
def references(tiny_model_dir):
    """name -> (model, tokenizer) loaded in-process, fp32."""
    out = {}
    for name, path in (("smollm2-135m-instruct", embedded_teacher_dir()), ("tiny", tiny_model_dir)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        out[name] = (model, AutoTokenizer.from_pretrained(path))
    return out


def expected(
    model,
    context: list[int],
    completion: list[int],
    top_k: int,
    temperature: float = 1.0,
    score_ids: list[list[int]] | None = None,
) -> dict:
    """Direct computation: full logits of one unpadded sequence, log-softmax in float64."""
    ids = torch.tensor([context + completion])
    with torch.no_grad():
        logits = model(ids).logits[0].double() / temperature
    logprobs_T_V = torch.log_softmax(logits, -1)[len(context) - 1 : len(context) - 1 + len(completion)]
    top_lp, top_ids = logprobs_T_V.topk(top_k, -1)
    tail = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1.0))
    out = {
        "token_logprobs": logprobs_T_V.gather(1, torch.tensor(completion)[:, None])[:, 0].numpy(),
        "top_ids": top_ids.numpy(),
        "top_logprobs": top_lp.numpy(),
        "tail_logprobs": tail.numpy(),
    }
    if score_ids is not None:
        out["score_logprobs"] = logprobs_T_V.gather(1, torch.tensor(score_ids)).numpy()
    return out


def assert_matches(got, want: dict) -> None:
    np.testing.assert_allclose(got.token_logprobs_T, want["token_logprobs"], atol=TOL, rtol=0)
    np.testing.assert_allclose(got.top_logprobs_T_K, want["top_logprobs"], atol=TOL, rtol=0)
    # ids agree wherever the reference's neighbouring logprobs are not tied within the tolerance
    gaps = np.abs(np.diff(want["top_logprobs"], axis=-1))
    untied = np.ones_like(want["top_ids"], dtype=bool)
    untied[:, 1:] &= gaps > TOL
    untied[:, :-1] &= gaps > TOL
    assert (got.top_ids_T_K[untied] == want["top_ids"][untied]).all()
    finite_tail = want["tail_logprobs"] > -20  # below that, log1p(-Σp) in float64 itself has no digits left
    np.testing.assert_allclose(got.tail_logprob_T[finite_tail], want["tail_logprobs"][finite_tail], atol=1e-3)
    if "score_logprobs" in want:
        np.testing.assert_allclose(got.score_logprobs_T_M, want["score_logprobs"], atol=TOL, rtol=0)


def chat_ids(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return (
        tokenizer(prompt, add_special_tokens=False)["input_ids"],
        tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"],
    )


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "tiny"])
def test_single_sequence_matches_transformers(teacher, references, name):
    model, tokenizer = references[name]
    prompt, completion = chat_ids(
        tokenizer, "What is the capital of France?", "The capital of France is Paris."
    )
    score_ids = [[0, 5, 100, tid] for tid in completion]
    body = {
        "model": name,
        "sequences": [{"token_ids": prompt + completion, "prompt_len": len(prompt)}],
        "top_k": 20,
        "score_ids": [score_ids],
    }
    result = score_result_from_json(post_score(teacher, body))
    assert result.model == name and result.scored_tokens == len(completion)
    got = result.sequences[0]
    assert got.top_ids_T_K.shape == (len(completion), 20)
    assert_matches(got, expected(model, prompt, completion, 20, score_ids=score_ids))


def test_mixed_length_batch_matches_unbatched(teacher, references):
    """Padding inside the service's batch must not leak into any sequence's scores."""
    model, tokenizer = references["smollm2-135m-instruct"]
    pairs = [
        ("Hi", "Hello! How can I help?"),
        ("Name three colours, please, in a list with commas.", "Red, green, blue."),
        ("2+2?", "4"),
        (
            "Write one long sentence about the sea and ships and harbours.",
            "The sea carries ships from harbour to harbour under a grey and patient sky, every day.",
        ),
    ]
    sequences, wants = [], []
    for question, answer in pairs:
        prompt, completion = chat_ids(tokenizer, question, answer)
        sequences.append({"token_ids": prompt + completion, "prompt_len": len(prompt)})
        wants.append(expected(model, prompt, completion, 8, temperature=0.7))
    result = score_result_from_json(
        post_score(teacher, {"sequences": sequences, "top_k": 8, "temperature": 0.7})
    )
    for got, want in zip(result.sequences, wants, strict=True):
        assert_matches(got, want)


def test_teacher_prefix_ids_scores_same_completion_after_other_prompt(teacher, references):
    model, tokenizer = references["smollm2-135m-instruct"]
    student_prompt, completion = chat_ids(tokenizer, "Solve it.", "x = 3")
    teacher_prompt, _ = chat_ids(tokenizer, "Solve 2x + 1 = 7 for x. The answer is x = 3.", "x = 3")
    body = {
        "sequences": [
            {
                "token_ids": student_prompt + completion,
                "prompt_len": len(student_prompt),
                "teacher_prefix_ids": teacher_prompt,
            },
            {"token_ids": student_prompt + completion, "prompt_len": len(student_prompt)},
        ],
        "top_k": 5,
    }
    privileged, plain = score_result_from_json(post_score(teacher, body)).sequences
    assert_matches(privileged, expected(model, teacher_prompt, completion, 5))
    assert_matches(plain, expected(model, student_prompt, completion, 5))
    # the privileged context really changes the teacher's view of the answer
    assert privileged.token_logprobs_T.sum() > plain.token_logprobs_T.sum() + 0.5


def test_prompt_len_zero_scores_every_token_after_bos(teacher, references):
    model, tokenizer = references["smollm2-135m-instruct"]
    ids = tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"]
    got = score_result_from_json(
        post_score(teacher, {"sequences": [{"token_ids": ids, "prompt_len": 0}], "top_k": 3})
    ).sequences[0]
    assert got.num_tokens == len(ids)
    assert_matches(got, expected(model, [tokenizer.bos_token_id], ids, 3))


def test_json_equals_binary(teacher):
    body = {
        "sequences": [
            {"token_ids": [1, 4093, 198, 6004, 2, 198, 1, 520, 9531, 198, 19556, 17], "prompt_len": 9},
            {"token_ids": [1, 520, 9531, 198, 34], "prompt_len": 1},
        ],
        "top_k": 16,
        "score_ids": [[[7, 8]] * 3, [[9, 10]] * 4],
    }
    as_json = score_result_from_json(post_score(teacher, body))
    as_binary = score_result_from_json(post_score(teacher, {**body, "format": "binary"}))
    for a, b in zip(as_json.sequences, as_binary.sequences, strict=True):
        for field in (
            "token_logprobs_T",
            "top_ids_T_K",
            "top_logprobs_T_K",
            "tail_logprob_T",
            "score_logprobs_T_M",
        ):
            assert np.array_equal(getattr(a, field), getattr(b, field)), field
            assert getattr(b, field).dtype in (np.float32, np.int32)


def test_no_nan_or_inf_at_full_vocab_and_one_hot(teacher):
    ids = [1, 4093, 198, 6004, 2, 198, 1, 520, 9531, 198, 19556]
    for body in (
        {"sequences": [{"token_ids": ids, "prompt_len": 6}], "top_k": 49152},  # top-k = whole vocabulary
        {"sequences": [{"token_ids": ids, "prompt_len": 6}], "top_k": 4, "temperature": 1e-4},  # one-hot
        {
            "model": "tiny",
            "sequences": [{"token_ids": ids, "prompt_len": 0}],
            "top_k": 49152,
            "temperature": 1e-4,
        },
    ):
        got = score_result_from_json(post_score(teacher, {**body, "format": "binary"})).sequences[0]
        for field in ("token_logprobs_T", "top_logprobs_T_K", "tail_logprob_T"):
            assert np.isfinite(getattr(got, field)).all(), (field, body["top_k"])
        if body["top_k"] == 49152:
            assert got.tail_logprob_T.max() < -80  # no mass outside the full vocabulary
            assert np.allclose(
                np.logaddexp.reduce(got.top_logprobs_T_K.astype(np.float64), axis=-1), 0, atol=1e-4
            )
            assert sorted(got.top_ids_T_K[0].tolist()) == list(range(49152))
