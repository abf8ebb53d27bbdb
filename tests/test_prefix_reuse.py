"""Prefix reuse in the HF backend: a prompt shared by several items runs once, the answers stay the same.

Every case compares the backend with reuse against the same weights without reuse and against a direct
transformers forward of each full sequence (log-softmax in float64), and checks from the forwards the model
actually ran that the prompt was shared (identical answers alone could come from the plain path).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

from opd_client.scores import SequenceScores
from opd_common.embedded import DEFAULT_TEACHER, embedded_teacher_dir
from opd_teacher.backends.base import ScoreItem
from opd_teacher.backends.hf import HFBackend, HFLimits
from opd_teacher.backends.plan import plan_score
from opd_teacher.batcher import BatchLimits

TOL = 1e-4  # nats, fp32


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return HFBackend("tiny", str(tiny_model_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def tiny_plain(tiny_model_dir):
    return HFBackend(
        "tiny", str(tiny_model_dir), dtype="float32", device="cpu", limits=HFLimits(prefix_reuse=False)
    )


@contextlib.contextmanager
def forwards(backend: HFBackend):
    """Records (batch rows, input length, key length) of every forward the backend's model runs."""
    log: list[tuple[int, int, int]] = []

    def hook(module, args, kwargs):
        rows, length = kwargs["input_ids"].shape
        mask = kwargs.get("attention_mask")
        log.append((rows, length, length if mask is None else mask.shape[-1]))

    handle = backend.model.base_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield log
    finally:
        handle.remove()


def reference(backend: HFBackend, item: ScoreItem, top_k: int, temperature: float) -> SequenceScores:
    """A direct transformers forward of the whole, unpadded sequence; log-softmax and tail in float64."""
    context = item.context_ids or [backend.bos_token_id]
    ids = list(context) + list(item.completion_ids)
    with torch.no_grad():
        logits_L_V = backend.model(torch.tensor([ids]), use_cache=False).logits[0].double()
    logprobs_T_V = torch.log_softmax(logits_L_V / temperature, -1)[len(context) - 1 : len(ids) - 1]
    top_lp_T_K, top_ids_T_K = logprobs_T_V.topk(top_k, -1)
    score_lp = None
    if item.score_ids_T_M is not None:
        score_lp = logprobs_T_V.gather(1, torch.as_tensor(item.score_ids_T_M)).numpy()
    return SequenceScores(
        token_logprobs_T=logprobs_T_V.gather(1, torch.tensor(item.completion_ids)[:, None])[:, 0].numpy(),
        top_ids_T_K=top_ids_T_K.numpy(),
        top_logprobs_T_K=top_lp_T_K.numpy(),
        tail_logprob_T=logprobs_T_V.scatter(1, top_ids_T_K, float("-inf")).logsumexp(-1).numpy(),
        score_logprobs_T_M=score_lp,
    )


def max_diff(got: SequenceScores, want: SequenceScores) -> float:
    diffs = []
    for attr in ("token_logprobs_T", "top_logprobs_T_K", "tail_logprob_T", "score_logprobs_T_M"):
        u, v = getattr(got, attr), getattr(want, attr)
        assert (u is None) == (v is None), attr
        if u is not None:
            assert u.shape == v.shape, attr
            diffs.append(float(np.max(np.abs(u - v))))
    return max(diffs)


def assert_close(got: SequenceScores, want: SequenceScores, teacher: SequenceScores) -> None:
    """Logprobs within TOL; top ids equal wherever the teacher's neighbouring logprobs are not tied.

    teacher holds one entry more than got and want (top-(K+1)): the K-th id is only fixed when the first
    id outside the top-K is not tied with it (seen on an AVX-512 CPU without AMX: two ids 1e-6 apart at
    the K-th place swapped between batch shapes).
    """
    assert max_diff(got, want) <= TOL
    K = got.top_ids_T_K.shape[1]
    assert teacher.top_logprobs_T_K.shape[1] == K + 1
    gaps_T_K = np.abs(np.diff(teacher.top_logprobs_T_K, axis=-1))
    untied_T_K = np.ones(got.top_ids_T_K.shape, dtype=bool)
    untied_T_K[:, 1:] &= gaps_T_K[:, : K - 1] > TOL
    untied_T_K &= gaps_T_K > TOL
    np.testing.assert_array_equal(got.top_ids_T_K[untied_T_K], want.top_ids_T_K[untied_T_K])


def check(
    reuse: HFBackend, plain: HFBackend, items: list[ScoreItem], top_k: int = 8, temperature: float = 1.0
):
    """Score with and without reuse, compare both to the direct forward; the forwards run with reuse."""
    with forwards(reuse) as log:
        got = reuse.score(items, top_k, temperature)
    without = plain.score(items, top_k, temperature)
    for item, a, b in zip(items, got, without, strict=True):
        want = reference(plain, item, top_k, temperature)
        ties = reference(plain, item, top_k + 1, temperature)
        assert_close(a, want, ties)
        assert_close(b, want, ties)
        assert_close(a, b, ties)
    return got, log


def tokens(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(3, 49000, n).tolist()


# ---- the backend --------------------------------------------------------------------------------------


def test_four_rollouts_share_one_prompt_run_once(tiny, tiny_plain):
    rng = np.random.default_rng(0)
    prompt = tokens(rng, 40)
    items = [ScoreItem(prompt, tokens(rng, 24)) for _ in range(4)]
    got, log = check(tiny, tiny_plain, items)

    assert tiny.prefix_reuse and not tiny_plain.prefix_reuse
    assert log == [(1, 40, 40), (4, 23, 63)]  # the prompt alone, then the completions on its cache
    assert tiny.last_forward_tokens == 40 + 4 * 23
    assert tiny.last_forward_tokens_I == [40 + 23, 23, 23, 23]
    assert tiny_plain.last_forward_tokens == 4 * 64
    # the comparison can tell prompts apart: the same completions after another prompt score differently
    other = tiny.score([ScoreItem(tokens(rng, 40), items[0].completion_ids)], 8, 1.0)[0]
    assert max_diff(other, got[0]) > 100 * TOL


def test_two_prompts_interleaved_with_singles(tiny, tiny_plain):
    rng = np.random.default_rng(1)
    a, b = tokens(rng, 30), tokens(rng, 17)
    contexts = [a, tokens(rng, 12), b, a, tokens(rng, 25), b, a, b]
    items = [ScoreItem(c, tokens(rng, 10 + 3 * i)) for i, c in enumerate(contexts)]
    _, log = check(tiny, tiny_plain, items, top_k=5)

    prompt_runs = sorted(shape for shape in log if shape[0] == 1 and shape[1] in (30, 17))
    assert prompt_runs == [(1, 17, 17), (1, 30, 30)]
    assert sorted(rows for rows, _, _ in log) == [1, 1, 2, 3, 3]  # 2 prompts, 2 groups, the 2 singles
    full = sum(it.forward_len for it in items)
    # each prompt runs once, not three times, and a group member's last token is not run at all
    assert tiny.last_forward_tokens == full - (2 * 30 + 2 * 17) - 6


def test_different_completion_lengths_in_a_group_including_one_token(tiny, tiny_plain):
    rng = np.random.default_rng(2)
    prompt = tokens(rng, 21)
    items = [ScoreItem(prompt, tokens(rng, n)) for n in (1, 33, 7, 18, 2)]
    _, log = check(tiny, tiny_plain, items)
    assert log == [(1, 21, 21), (5, 32, 21 + 32)]


def test_a_group_of_one_token_completions_needs_only_the_prompt(tiny, tiny_plain):
    rng = np.random.default_rng(3)
    prompt = tokens(rng, 15)
    _, log = check(tiny, tiny_plain, [ScoreItem(prompt, tokens(rng, 1)) for _ in range(3)])
    assert log == [(1, 15, 15)]


def test_score_ids_for_some_members(tiny, tiny_plain):
    rng = np.random.default_rng(4)
    prompt = tokens(rng, 19)
    items = []
    for i, n in enumerate((9, 14, 5)):
        score_ids = rng.integers(0, 49000, (n, 2 + i)) if i != 1 else None
        items.append(ScoreItem(prompt, tokens(rng, n), score_ids))
    got, log = check(tiny, tiny_plain, items, top_k=3)
    assert (
        log[0] == (1, 19, 19)
        and got[1].score_logprobs_T_M is None
        and got[2].score_logprobs_T_M.shape == (5, 4)
    )


@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature(tiny, tiny_plain, temperature):
    rng = np.random.default_rng(5)
    prompt = tokens(rng, 26)
    items = [ScoreItem(prompt, tokens(rng, n)) for n in (12, 20, 16)]
    _, log = check(tiny, tiny_plain, items, top_k=16, temperature=temperature)
    assert log[0] == (1, 26, 26)


def test_empty_teacher_contexts_share_the_bos_prompt(tiny, tiny_plain):
    rng = np.random.default_rng(6)
    bos = tiny.bos_token_id
    items = [ScoreItem([], tokens(rng, n)) for n in (8, 13, 3)] + [ScoreItem([bos], tokens(rng, 6))]
    _, log = check(tiny, tiny_plain, items)
    assert log == [(1, 1, 1), (4, 12, 13)]  # [] and [BOS] are the same teacher view


def test_a_group_larger_than_max_batch_tokens_is_split_and_each_forward_fits(tiny_model_dir, tiny_plain):
    budget = 200
    small = HFBackend(
        "tiny", str(tiny_model_dir), dtype="float32", device="cpu", batch=BatchLimits(max_batch_tokens=budget)
    )
    rng = np.random.default_rng(7)
    prompt = tokens(rng, 40)
    items = [ScoreItem(prompt, tokens(rng, n)) for n in (30, 10, 25, 35, 18, 29, 40, 12, 22)]
    items.append(ScoreItem(tokens(rng, 20), tokens(rng, 15)))  # and a single on the plain path
    _, log = check(small, tiny_plain, items)

    prompt_runs = [shape for shape in log if shape == (1, 40, 40)]
    assert len(prompt_runs) == 1  # once for the whole group, whatever the chunks
    chunks = [shape for shape in log if shape[2] > shape[1]]  # completion forwards see the prompt's keys
    assert len(chunks) >= 3 and sum(rows for rows, _, _ in chunks) == 9
    for rows, _, keys in log:  # padded rows × (prompt + longest completion) within the budget
        assert rows * keys <= budget or rows == 1


def test_batch_invariant_mode_is_bit_identical_to_single_requests(tiny_model_dir):
    invariant = HFBackend(
        "inv", str(tiny_model_dir), dtype="float32", device="cpu", limits=HFLimits(batch_invariant=True)
    )
    rng = np.random.default_rng(8)
    shared = tokens(rng, 8)
    items = [ScoreItem(tokens(rng, 8), tokens(rng, 32)) for _ in range(3)]
    items += [ScoreItem(shared, tokens(rng, n)) for n in (5, 17, 30)]  # a shared prompt, mixed lengths
    together = invariant.score(items, 8, 1.0)
    for item, batched in zip(items, together, strict=True):
        assert max_diff(invariant.score([item], 8, 1.0)[0], batched) == 0.0
    batched = HFBackend("batched", str(tiny_model_dir), dtype="float32", device="cpu").score(items, 8, 1.0)
    assert max(max_diff(a, b) for a, b in zip(together, batched, strict=True)) <= 1e-4


def test_default_teacher_chat_prompt_with_four_rollouts():
    teacher = HFBackend("default", DEFAULT_TEACHER, dtype="float32", device="cpu")
    tokenizer = teacher.tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three prime numbers and explain why they are prime."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompt_ids = teacher.tokenize_text(prompt, add_special_tokens=False)
    answers = [
        "2, 3 and 5.",
        "Two, three, five: each has no divisor but 1 and itself.",
        "7",
        "11, 13, 17 are",
    ]
    items = [ScoreItem(prompt_ids, teacher.tokenize_text(a + "<|im_end|>", False)) for a in answers]
    with forwards(teacher) as log:
        with_reuse = teacher.score(items, 20, 1.0)
    assert log == [(1, len(prompt_ids), len(prompt_ids)), (4, log[1][1], len(prompt_ids) + log[1][1])]
    teacher.prefix_reuse = False  # the same weights, every item in full
    without = teacher.score(items, 20, 1.0)
    for item, a, b in zip(items, with_reuse, without, strict=True):
        want, ties = reference(teacher, item, 20, 1.0), reference(teacher, item, 21, 1.0)
        assert_close(a, want, ties)
        assert_close(b, want, ties)
        assert_close(a, b, ties)


# ---- models that cannot share a prompt ----------------------------------------------------------------


@pytest.fixture(scope="module")
def sliding_model_dir(tmp_path_factory) -> Path:
    """A tiny Mistral with a sliding window: its cache layers drop old keys, so reuse must turn itself off."""
    out = tmp_path_factory.mktemp("models") / "sliding"
    tokenizer = AutoTokenizer.from_pretrained(embedded_teacher_dir())
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    MistralForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_model_whose_cache_cannot_be_shared_falls_back_to_full_sequences(sliding_model_dir):
    backend = HFBackend("sliding", str(sliding_model_dir), dtype="float32", device="cpu")
    assert not backend.prefix_reuse
    rng = np.random.default_rng(9)
    prompt = tokens(rng, 12)
    items = [ScoreItem(prompt, tokens(rng, n)) for n in (6, 9)]
    with forwards(backend) as log:
        got = backend.score(items, 8, 1.0)
    assert log == [(2, 21, 21)]
    for item, a in zip(items, got, strict=True):
        assert_close(a, reference(backend, item, 8, 1.0), reference(backend, item, 9, 1.0))


# ---- the plan -----------------------------------------------------------------------------------------


def test_plan_without_reuse_is_the_length_sorted_micro_batching():
    contexts = [(1, 2, 3), (4,), (1, 2, 3), (5, 6)]
    lens = [5, 2, 1, 9]
    plan = plan_score(contexts, lens, max_batch_tokens=16, prefix_reuse=False)
    assert plan.groups == [] and plan.batches == [[1, 2], [0], [3]]
    assert plan.forward_tokens_I == [8, 3, 4, 11]


def test_plan_groups_shared_contexts_and_charges_the_prompt_once():
    contexts = [(1, 2, 3), (4,), (1, 2, 3), (5, 6), (1, 2, 3)]
    lens = [5, 2, 1, 9, 4]
    plan = plan_score(contexts, lens, max_batch_tokens=100)
    assert [(g.prompt_len, g.chunks) for g in plan.groups] == [(3, [[2, 4, 0]])]
    assert plan.batches == [[1, 3]]
    assert plan.forward_tokens_I == [3 + 4, 3, 0, 11, 3]
    assert plan.forward_tokens == 24  # vs 8 + 3 + 4 + 11 + 7 = 33 in full


def test_plan_splits_a_group_under_the_budget():
    plan = plan_score([(7,) * 10] * 6, [10, 30, 20, 10, 30, 20], max_batch_tokens=80)
    (group,) = plan.groups
    for chunk in group.chunks:
        assert len(chunk) * max(10 + [10, 30, 20, 10, 30, 20][i] for i in chunk) <= 80
    assert sorted(group.members) == list(range(6)) and plan.batches == []
