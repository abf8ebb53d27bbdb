"""Sampling from a Hugging Face causal LM for the OpenAI-compatible endpoints: one prompt, n samples at once.

The prompt runs once; its KV cache is repeated for the n samples, which then decode one token per step.
The logprobs reported are the model's own distribution (temperature 1, before top-k/top-p/min-p), as vLLM
reports them by default, computed by the same function as scoring (topk.logprobs_of), so they equal what
/v1/score gives for the same tokens up to float summation order. Sampling applies temperature, top-k,
top-p and min-p in that order; temperature 0 is greedy (argmax). A request decodes step by step
(Generation.step), so the engine can run score batches between two of its tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from opd_teacher.backends.topk import logprobs_of

if TYPE_CHECKING:  # hf.py loads the model; this module only runs it
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int  # >= 1
    n: int = 1
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: the whole vocabulary
    min_p: float = 0.0
    seed: int | None = None  # None: a fresh random seed
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0  # most likely alternatives reported per generated token
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


@dataclass
class Sample:
    """One generated sequence; T = len(token_ids), N = SamplingParams.logprobs (at least 1)."""

    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)  # [T]
    top_ids: list[list[int]] = field(default_factory=list)  # [T][N] descending
    top_logprobs: list[list[float]] = field(default_factory=list)  # [T][N]
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length"
    stop_reason: str | int | None = None  # the stop string or stop token id (None: EOS or length), as vLLM


class Generation:
    """One request's decode, advanced by step(): the prompt on the first call, then one token per call.

    The engine runs each step as its own task on the forward thread, so score batches run between two steps
    of a long generation instead of waiting for all of it. Not thread-safe: one step() at a time.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        decode: Callable[[list[int], bool], str],
        prompt_ids: list[int],
        params: SamplingParams,
        eos_ids: frozenset[int],
        cache_kwarg: str | None,
        softcap: float | None = None,
    ) -> None:
        self.model, self.decode, self.prompt_ids, self.params = model, decode, prompt_ids, params
        self.eos_ids, self.softcap = eos_ids, softcap
        self.generator = torch.Generator(device="cpu")
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed % (1 << 64))
        device = model.get_output_embeddings().weight.device
        self._stepper = _Stepper(model, cache_kwarg, device)
        self._hidden_N_H: torch.Tensor | None = None  # the last positions' hidden states, None before prefill
        self.samples = [Sample() for _ in range(params.n)]
        self.steps = 0  # tokens drawn per sample so far
        self.done = False

    @torch.inference_mode()
    def step(self) -> bool:
        """Draws the next token of every unfinished sample; True once all samples have finished."""
        if self.done:
            return True
        params = self.params
        if self._hidden_N_H is None:
            self._hidden_N_H = self._stepper.prefill(self.prompt_ids, params.n)
        logits_N_V = self.model.get_output_embeddings()(self._hidden_N_H)
        logprobs_N_V = logprobs_of(logits_N_V, 1.0, self.softcap)
        next_N = sample_next(logprobs_N_V, params, self.generator)
        token_lp_N = logprobs_N_V.gather(1, next_N[:, None])[:, 0].tolist()
        top_lp_N_K, top_ids_N_K = logprobs_N_V.topk(max(params.logprobs, 1), dim=-1)
        next_ids, top_ids, top_lps = next_N.tolist(), top_ids_N_K.tolist(), top_lp_N_K.tolist()
        self.steps += 1
        is_last = self.steps == params.max_tokens
        for b, sample in enumerate(self.samples):
            if sample.finish_reason is None:
                sample.token_ids.append(next_ids[b])
                sample.token_logprobs.append(token_lp_N[b])
                sample.top_ids.append(top_ids[b])
                sample.top_logprobs.append(top_lps[b])
                _check_finished(sample, params, self.eos_ids, self.decode, is_last=is_last)
        self.done = all(s.finish_reason is not None for s in self.samples)
        if not self.done:
            self._hidden_N_H = self._stepper.next(next_N)
        return self.done


def generate(
    model: PreTrainedModel,
    decode: Callable[[list[int], bool], str],
    prompt_ids: list[int],
    params: SamplingParams,
    eos_ids: frozenset[int],
    cache_kwarg: str | None,
    softcap: float | None = None,
) -> list[Sample]:
    """`params.n` samples continuing `prompt_ids` (non-empty), all steps at once (no interleaving)."""
    generation = Generation(model, decode, prompt_ids, params, eos_ids, cache_kwarg, softcap)
    while not generation.step():
        pass
    return generation.samples


class _Stepper:
    """Runs the decoder: the prompt once, then one token per sample and step on the KV cache."""

    def __init__(self, model: PreTrainedModel, cache_kwarg: str | None, device: torch.device):
        self.model, self.cache_kwarg, self.device = model, cache_kwarg, device
        self.cache: Any = None  # the model's KV cache (a transformers Cache), None before prefill
        self.ids_N_L: torch.Tensor | None = None  # the whole sequences, for models that take no cache

    def prefill(self, prompt_ids: list[int], n: int) -> torch.Tensor:
        ids_1_L = torch.tensor([prompt_ids], device=self.device)
        if self.cache_kwarg is None:
            self.ids_N_L = ids_1_L.expand(n, -1)
            return self.model.base_model(input_ids=self.ids_N_L).last_hidden_state[:, -1]
        out = self.model.base_model(input_ids=ids_1_L, use_cache=True)
        self.cache = _cache_of(out)
        if n > 1:
            try:  # the prompt's keys/values copied n times: cheaper than running the prompt n times
                self.cache.batch_repeat_interleave(n)
            except (AttributeError, NotImplementedError):
                out = self.model.base_model(input_ids=ids_1_L.expand(n, -1), use_cache=True)
                self.cache = _cache_of(out)
                return out.last_hidden_state[:, -1]
        return out.last_hidden_state[:, -1].expand(n, -1)

    def next(self, next_N: torch.Tensor) -> torch.Tensor:
        next_N_1 = next_N[:, None].to(self.device)
        if self.cache_kwarg is None:
            assert self.ids_N_L is not None, "prefill() comes first"
            self.ids_N_L = torch.cat([self.ids_N_L, next_N_1], dim=1)
            return self.model.base_model(input_ids=self.ids_N_L).last_hidden_state[:, -1]
        out = self.model.base_model(input_ids=next_N_1, use_cache=True, **{self.cache_kwarg: self.cache})
        self.cache = _cache_of(out)
        return out.last_hidden_state[:, -1]


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values  # the name before transformers renamed it


def sample_next(
    logprobs_N_V: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> torch.Tensor:
    """Next token per row (on the logprobs' device): argmax at temperature 0, else a draw after temperature,
    top-k, top-p and min-p.

    Every filter keeps each row's most likely token, so any valid parameters leave something to draw: a
    degenerate nucleus (top_p = 1e-300) or a tiny temperature ends up greedy, never NaN. The arithmetic runs
    in float64 on CPU, where parameters far below float32's range keep their value (float32 would round
    top_p = 1e-300 to 0 and drop every token) and a seeded generator gives the same samples anywhere.
    """
    if params.temperature == 0:
        return logprobs_N_V.argmax(dim=-1)
    logprobs_N_V64 = logprobs_N_V.detach().to("cpu", torch.float64)
    # Shifted so each row's best is exactly 0: divided by any temperature > 0 it stays 0 (never 0 / 0 or
    # -inf), while the others go to -inf when the temperature is tiny. The same law as logprobs / T.
    best_N_1 = logprobs_N_V64.max(dim=-1, keepdim=True).values
    scores_N_V = (logprobs_N_V64 - best_N_1) / params.temperature
    vocab = scores_N_V.shape[-1]
    if 0 < params.top_k < vocab:
        kth_N_1 = scores_N_V.topk(params.top_k, dim=-1).values[:, -1:]
        scores_N_V = scores_N_V.masked_fill(scores_N_V < kth_N_1, float("-inf"))
    if params.top_p < 1.0:
        sorted_N_V, order_N_V = scores_N_V.sort(dim=-1, descending=True)
        probs_N_V = sorted_N_V.softmax(dim=-1)
        # drop a token once the more likely ones already hold top_p of the mass; the first is always kept
        drop_N_V = probs_N_V.cumsum(dim=-1) - probs_N_V >= params.top_p
        drop_N_V[:, 0] = False
        scores_N_V = scores_N_V.scatter(1, order_N_V, sorted_N_V.masked_fill(drop_N_V, float("-inf")))
    probs_N_V = scores_N_V.softmax(dim=-1)
    if params.min_p > 0.0:  # min_p <= 1: the best token is never below min_p x itself
        floor_N_1 = probs_N_V.max(dim=-1, keepdim=True).values * params.min_p
        probs_N_V = probs_N_V.masked_fill(probs_N_V < floor_N_1, 0.0)
    return torch.multinomial(probs_N_V, 1, generator=generator)[:, 0].to(logprobs_N_V.device)


def _check_finished(
    sample: Sample,
    params: SamplingParams,
    eos_ids: frozenset[int],
    decode: Callable[[list[int], bool], str],
    is_last: bool,
) -> None:
    """Sets finish_reason / stop_reason / text once the sample's last token ends it."""
    last = sample.token_ids[-1]
    if last in params.stop_token_ids or (not params.ignore_eos and last in eos_ids):
        sample.finish_reason = "stop"
        sample.stop_reason = last if last in params.stop_token_ids else None
        sample.text = decode(sample.token_ids[:-1], params.skip_special_tokens)
        return
    if params.stop or is_last:
        text = decode(sample.token_ids, params.skip_special_tokens)
        hit = _first_stop(text, params.stop)
        if hit is not None:
            at, stop = hit
            sample.finish_reason, sample.stop_reason = "stop", stop
            sample.text = text[: at + len(stop)] if params.include_stop_str_in_output else text[:at]
        elif is_last:
            sample.finish_reason, sample.text = "length", text


def _first_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """(position, stop string) of the earliest stop string in text, if any."""
    hits = [(text.find(s), s) for s in stops if s and s in text]
    return min(hits) if hits else None
