"""Sampling from a Hugging Face causal LM for the OpenAI-compatible endpoints: one prompt, n samples at once.

The prompt runs once; its KV cache is repeated for the n samples, which then decode one token per step.
The logprobs reported are the model's own distribution (temperature 1, before top-k/top-p/min-p), as vLLM
reports them by default, computed by the same function as scoring (topk.logprobs_of), so they equal what
/v1/score gives for the same tokens up to float summation order. Sampling applies temperature, top-k,
top-p and min-p in that order; temperature 0 is greedy (argmax).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from opd_teacher.backends.topk import logprobs_of


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


class GenerationCancelled(Exception):
    """The caller went away; the forward thread stops decoding at the next token."""


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    decode: Callable[[list[int], bool], str],
    prompt_ids: list[int],
    params: SamplingParams,
    eos_ids: frozenset[int],
    cache_kwarg: str | None,
    softcap: float | None = None,
    cancel: threading.Event | None = None,
) -> list[Sample]:
    """`params.n` samples continuing `prompt_ids` (non-empty). `decode(ids, skip_special_tokens)` -> text."""
    if cancel is not None and cancel.is_set():  # gone while it waited for the forward thread
        raise GenerationCancelled()
    device = model.get_output_embeddings().weight.device
    generator = torch.Generator(device="cpu")
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed % (1 << 64))
    n = params.n
    step = _Stepper(model, cache_kwarg, device)
    hidden_N_H = step.prefill(prompt_ids, n)
    samples = [Sample() for _ in range(n)]
    top_n = max(params.logprobs, 1)
    for t in range(params.max_tokens):
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled()
        logits_N_V = model.get_output_embeddings()(hidden_N_H)
        logprobs_N_V = logprobs_of(logits_N_V, 1.0, softcap)
        next_N = _sample(logprobs_N_V, params, generator)
        token_lp_N = logprobs_N_V.gather(1, next_N[:, None])[:, 0].tolist()
        top_lp_N_K, top_ids_N_K = logprobs_N_V.topk(top_n, dim=-1)
        next_ids, top_ids, top_lps = next_N.tolist(), top_ids_N_K.tolist(), top_lp_N_K.tolist()
        for b, sample in enumerate(samples):
            if sample.finish_reason is None:
                sample.token_ids.append(next_ids[b])
                sample.token_logprobs.append(token_lp_N[b])
                sample.top_ids.append(top_ids[b])
                sample.top_logprobs.append(top_lps[b])
                _check_finished(sample, params, eos_ids, decode, is_last=t == params.max_tokens - 1)
        if all(s.finish_reason is not None for s in samples):
            break
        hidden_N_H = step.next(next_N)
    return samples


class _Stepper:
    """Runs the decoder: the prompt once, then one token per sample and step on the KV cache."""

    def __init__(self, model: torch.nn.Module, cache_kwarg: str | None, device: torch.device):
        self.model, self.cache_kwarg, self.device = model, cache_kwarg, device
        self.cache = None
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
            self.ids_N_L = torch.cat([self.ids_N_L, next_N_1], dim=1)
            return self.model.base_model(input_ids=self.ids_N_L).last_hidden_state[:, -1]
        out = self.model.base_model(input_ids=next_N_1, use_cache=True, **{self.cache_kwarg: self.cache})
        self.cache = _cache_of(out)
        return out.last_hidden_state[:, -1]


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values  # the name before transformers renamed it


def _sample(logprobs_N_V: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """Next token per row (on the logprobs' device): argmax at temperature 0, else a draw after temperature,
    top-k, top-p and min-p. The draw runs on CPU, where a seeded generator gives the same samples anywhere."""
    if params.temperature == 0:
        return logprobs_N_V.argmax(dim=-1)
    # log-softmax is the logits shifted per row, so dividing it by the temperature samples the same law
    scores_N_V = logprobs_N_V / params.temperature
    vocab = scores_N_V.shape[-1]
    if 0 < params.top_k < vocab:
        kth_N_1 = scores_N_V.topk(params.top_k, dim=-1).values[:, -1:]
        scores_N_V = scores_N_V.masked_fill(scores_N_V < kth_N_1, float("-inf"))
    if params.top_p < 1.0:
        sorted_N_V, order_N_V = scores_N_V.sort(dim=-1, descending=True)
        probs_N_V = sorted_N_V.softmax(dim=-1)
        # drop a token once the more likely ones already hold top_p of the mass (the first is always kept)
        drop_N_V = probs_N_V.cumsum(dim=-1) - probs_N_V >= params.top_p
        scores_N_V = scores_N_V.scatter(1, order_N_V, sorted_N_V.masked_fill(drop_N_V, float("-inf")))
    probs_N_V = scores_N_V.softmax(dim=-1)
    if params.min_p > 0.0:
        floor_N_1 = probs_N_V.max(dim=-1, keepdim=True).values * params.min_p
        probs_N_V = probs_N_V.masked_fill(probs_N_V < floor_N_1, 0.0)
    return torch.multinomial(probs_N_V.cpu(), 1, generator=generator)[:, 0].to(logprobs_N_V.device)


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
