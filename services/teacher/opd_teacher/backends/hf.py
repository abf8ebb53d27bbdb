"""White-box teacher on a Hugging Face causal LM: loads the model, runs the forward, scores in chunks.

Items sharing a teacher context (G rollouts of one prompt) run that prompt once: a batch-1 forward keeps its
KV cache, and the completions run on top of it (plan.py decides which items go which way).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import Cache, DynamicLayer

from opd_client.schema import ModelInfo
from opd_client.scores import SequenceScores
from opd_client.tokenizer_hash import tokenizer_sha256
from opd_common.embedded import resolve_model
from opd_teacher.backends.base import ScoreItem
from opd_teacher.backends.generate import Generation, SamplingParams
from opd_teacher.backends.head import MAX_HIDDEN_BYTES, export_head, logit_scale_of, softcap_of
from opd_teacher.backends.live_weights import LiveWeights
from opd_teacher.backends.plan import plan_score
from opd_teacher.backends.prefix_cache import NoPrefixReuse, Prefix
from opd_teacher.backends.results import RankedScores, hidden_rows, pad_cat, split_scores  # noqa: F401
from opd_teacher.backends.steering import SteeringOptions, attach_steering
from opd_teacher.backends.topk import score_hidden
from opd_teacher.batcher import BatchLimits

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class HFLimits:
    """The white-box backend's limits; `opd serve-teacher`'s flags are generated from these fields (each
    comment is the flag's --help). Its forwards' token budget is the batcher's, BatchLimits.max_batch_tokens:
    one setting, which HFBackend takes as `batch`."""

    max_top_k: int = 1024  # largest top_k a request may ask for
    # tokens per request (teacher view: context + completion, summed over sequences); more gets 413
    max_tokens: int = 65536
    max_sequence_len: int | None = None  # tokens per sequence (default: the model's max_position_embeddings)
    logits_block_tokens: int = 512  # rows of logits materialised at once
    prefix_reuse: bool = True  # run a prompt shared by several items once (off: every item in full)
    # Every item in its own forward, so its floats never depend on its batch mates (CPU and GPU kernels
    # choose reduction orders by matrix shape). Costs GPU throughput; on CPU batching gains little anyway.
    batch_invariant: bool = False


def pick_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 on accelerators; fp32 on CPU, where exactness matters more than the ~2x speed.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


class HFBackend:
    """One teacher model. Not thread-safe: the caller runs one score() at a time."""

    def __init__(
        self,
        name: str,
        model: str,
        dtype: str = "auto",
        device: str = "auto",
        limits: HFLimits = HFLimits(),
        batch: BatchLimits | None = None,  # its max_batch_tokens bounds each forward's padded tokens
        steering: SteeringOptions | None = None,  # a steering vector added to the residual stream (SafeSteer)
    ):
        path, source = resolve_model(model)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.limits = limits
        self.max_batch_tokens = (batch or BatchLimits()).max_batch_tokens
        log.info("loading %s from %s (%s, %s)", name, path, self.dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        self.steering = attach_steering(self.model, steering, name)  # before the load-time checks run it
        config = self.model.config
        self.bos_token_id = _bos_token_id(self.tokenizer, config)
        self.pad_token_id = self.tokenizer.pad_token_id or 0
        self.eos_token_ids = _eos_token_ids(self.tokenizer, self.model)
        max_positions = getattr(config, "max_position_embeddings", None) or 1 << 20
        vocab_size = self.model.get_output_embeddings().weight.shape[0]
        # The head trainers download (and the logit transform this service applies itself, from the same
        # config fields); None when the formula does not reproduce the model's logits: no hidden states.
        self.head, why_not = export_head(self.model, _probe_ids(vocab_size))
        if why_not:
            log.warning("%s: no hidden states or head (return_hidden is refused): %s", name, why_not)
        self.logit_scale = logit_scale_of(config)
        self.softcap = softcap_of(config)
        self.info = ModelInfo(
            name=name,
            revision=_weights_sha256(path),
            vocab_size=vocab_size,
            tokenizer_sha256=tokenizer_sha256(self.tokenizer),
            max_top_k=min(limits.max_top_k, vocab_size),
            max_tokens=limits.max_tokens,
            max_sequence_len=min(limits.max_sequence_len or max_positions, max_positions),
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            source=source,
            hidden_size=self.head.hidden_size if self.head else None,
            head_sha256=self.head.sha256 if self.head else None,
            logit_scale=self.logit_scale,
            final_logit_softcapping=self.softcap,
            tokenizer_vocab_size=len(self.tokenizer),
            max_hidden_bytes=MAX_HIDDEN_BYTES if self.head else None,
        )
        self.weights = LiveWeights(self.model, self.head)  # live updates: engine.update_weights
        self._cache_kwarg = _cache_kwarg(self.model.base_model)
        self.prefix_reuse = False
        if limits.prefix_reuse:
            why_not = self._check_prefix_reuse()
            self.prefix_reuse = why_not is None
            if why_not:
                log.warning("%s: prefix reuse off, every item runs in full: %s", name, why_not)
        # Token positions the last score() call ran through the model (unpadded; a shared prompt counts once),
        # in total and per item (a group's prompt is charged to its first member). Set by score().
        self.last_forward_tokens = 0
        self.last_forward_tokens_I: list[int] = []

    def warm_up(self) -> None:
        """One small forward, so the first real request does not pay for lazy initialisation."""
        self.score([ScoreItem(context_ids=[0, 1], completion_ids=[2, 3])], top_k=1, temperature=1.0)

    # ---- scoring ------------------------------------------------------------------------------------

    def score(
        self, items: list[ScoreItem], top_k: int, temperature: float, ranks: bool = False
    ) -> list[SequenceScores]:
        """Scores per item; with `ranks` they are RankedScores (each token's rank in the vocabulary too)."""
        if self.limits.batch_invariant:
            self.last_forward_tokens_I = [item.forward_len for item in items]
            self.last_forward_tokens = sum(self.last_forward_tokens_I)
            return [self._score_batch([item], top_k, temperature, ranks)[0] for item in items]
        contexts = [tuple(self._teacher_context(item)) for item in items]
        plan = plan_score(
            contexts,
            [len(item.completion_ids) for item in items],
            self.max_batch_tokens,
            prefix_reuse=self.prefix_reuse,
        )
        results: list[SequenceScores | None] = [None] * len(items)
        for group in plan.groups:
            prompt = list(contexts[group.chunks[0][0]])
            chunks = [[items[i] for i in chunk] for chunk in group.chunks]
            for i, scores in zip(
                group.members, self._score_group(prompt, chunks, top_k, temperature, ranks), strict=True
            ):
                results[i] = scores
        for batch_idx in plan.batches:
            scored = self._score_batch([items[i] for i in batch_idx], top_k, temperature, ranks)
            for i, scores in zip(batch_idx, scored, strict=True):
                results[i] = scores
        self.last_forward_tokens, self.last_forward_tokens_I = plan.forward_tokens, plan.forward_tokens_I
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _score_batch(
        self, items: list[ScoreItem], top_k: int, temperature: float, ranks: bool = False
    ) -> list[SequenceScores]:
        """Whole sequences, right padded, in one forward."""
        rows = [self._teacher_ids(item) for item in items]
        length = max(len(r) for r in rows)
        input_ids_B_L = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask_B_L = torch.zeros((len(rows), length), dtype=torch.long)
        for b, ids in enumerate(rows):  # right padding: causal attention never sees the pad
            input_ids_B_L[b, : len(ids)] = torch.tensor(ids)
            attention_mask_B_L[b, : len(ids)] = 1
        hidden_B_L_H = self.model.base_model(
            input_ids=input_ids_B_L.to(self.device),
            attention_mask=attention_mask_B_L.to(self.device),
            use_cache=False,  # one pass, no decoding: a KV cache would only cost memory
        ).last_hidden_state

        # The hidden state at position j predicts token j + 1: completion token t is scored from j = t - 1.
        picks = []
        for b, (item, ids) in enumerate(zip(items, rows, strict=True)):
            start = len(ids) - len(item.completion_ids)
            picks.append(hidden_B_L_H[b, start - 1 : len(ids) - 1])
        return self._score_picks(picks, items, top_k, temperature, ranks)

    @torch.inference_mode()
    def _score_group(
        self,
        prompt: list[int],
        chunks: list[list[ScoreItem]],
        top_k: int,
        temperature: float,
        ranks: bool = False,
    ) -> list[SequenceScores]:
        """Items whose teacher context is `prompt`: the prompt runs once, each chunk of completions on its cache.

        The prompt's last hidden state predicts every member's first completion token; completion position j
        predicts token j + 1, so a completion's last token is not run at all.
        """
        prefix = self._run_prompt(prompt)
        results = []
        for members in chunks:
            inputs = [item.completion_ids[:-1] for item in members]
            length = max(len(ids) for ids in inputs)
            picks = [prefix.last_hidden_1_H] * len(members)
            if length:  # else every member has one token, predicted by the prompt alone
                hidden_B_L_H = self._run_on_prefix(prefix, inputs, length)
                for b, ids in enumerate(inputs):
                    picks[b] = torch.cat([prefix.last_hidden_1_H, hidden_B_L_H[b, : len(ids)]])
            results.extend(self._score_picks(picks, members, top_k, temperature, ranks))
        return results

    def _run_prompt(self, prompt: list[int]) -> Prefix:
        out = self.model.base_model(input_ids=torch.tensor([prompt], device=self.device), use_cache=True)
        cache = getattr(out, "cache", None)
        if cache is None:  # models written before transformers renamed it
            cache = getattr(out, "past_key_values", None)
        # Only plain full-attention layers are reused: sliding-window, linear-attention or shared-KV layers keep
        # state that a frozen copy of the prompt's keys would not reproduce.
        if not isinstance(cache, Cache) or not cache.layers:
            raise NoPrefixReuse(f"the forward returned {type(cache).__name__}, not a transformers Cache")
        for layer in cache.layers:
            if type(layer) is not DynamicLayer or layer.keys is None or layer.keys.shape[-2] != len(prompt):
                raise NoPrefixReuse(f"its cache has {type(layer).__name__} layers, not full-attention ones")
        return Prefix(
            last_hidden_1_H=out.last_hidden_state[0, -1:],
            keys_values=[(layer.keys, layer.values) for layer in cache.layers],
        )

    def _run_on_prefix(self, prefix: Prefix, inputs: list[list[int]], length: int) -> torch.Tensor:
        """Hidden states [B, length, H] of right-padded completions that continue the prompt in `prefix`."""
        assert self._cache_kwarg is not None, "prefix reuse is on only for a forward that takes a cache"
        prompt_len = prefix.length
        input_ids_B_L = torch.full((len(inputs), length), self.pad_token_id, dtype=torch.long)
        attention_mask_B_PL = torch.zeros((len(inputs), prompt_len + length), dtype=torch.long)
        attention_mask_B_PL[:, :prompt_len] = 1
        for b, ids in enumerate(inputs):
            input_ids_B_L[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask_B_PL[b, prompt_len : prompt_len + len(ids)] = 1
        position_ids_B_L = torch.arange(prompt_len, prompt_len + length).repeat(len(inputs), 1)
        return self.model.base_model(
            input_ids=input_ids_B_L.to(self.device),
            attention_mask=attention_mask_B_PL.to(self.device),
            position_ids=position_ids_B_L.to(self.device),
            use_cache=True,
            **{self._cache_kwarg: prefix.cache(len(inputs))},
        ).last_hidden_state

    def _score_picks(
        self,
        picks: list[torch.Tensor],
        items: list[ScoreItem],
        top_k: int,
        temperature: float,
        ranks: bool = False,
    ) -> list[SequenceScores]:
        """Score items from their hidden states, picks[i] = [T_i, H] (row t predicts completion token t): the
        same rows an item with return_hidden gets back as hidden_T_D."""
        targets, score_ids = [], []
        for item in items:
            targets.extend(item.completion_ids)
            if item.score_ids_T_M is not None:
                score_ids.append(torch.as_tensor(item.score_ids_T_M, dtype=torch.long))
            else:  # placeholder rows keep the blocks aligned when only some items ask for score ids
                score_ids.append(torch.zeros((len(item.completion_ids), 1), dtype=torch.long))
        hidden = hidden_rows(picks, items)
        if top_k == 0:  # hidden states only (validation: every item asked for them); no lm_head at all
            return split_scores(None, hidden, items)
        has_score_ids = any(item.score_ids_T_M is not None for item in items)
        out = score_hidden(
            torch.cat(picks),
            self.model.get_output_embeddings(),
            torch.tensor(targets, dtype=torch.long),
            top_k=top_k,
            temperature=temperature,
            score_ids_N_M=pad_cat(score_ids) if has_score_ids else None,
            chunk_tokens=self.limits.logits_block_tokens,
            softcap=self.softcap,
            ranks=ranks,
            logit_scale=self.logit_scale,
        )
        return split_scores(out, hidden, items)

    def _check_prefix_reuse(self) -> str | None:
        """None if prefix reuse gives this model's plain answers on a short check, else why it cannot be used."""
        if self._cache_kwarg is None:
            return "its forward takes no cache"
        ids = _probe_ids(self.info.vocab_size)
        items = [ScoreItem(ids[:6], ids[6:8]), ScoreItem(ids[:6], ids[6:]), ScoreItem(ids[:6], ids[9:10])]
        try:  # a model we know nothing about may fail in any way here; that only means no reuse
            reused = self._score_group(ids[:6], [items], top_k=4, temperature=1.0)
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        diff = 0.0
        for item, got in zip(items, reused, strict=True):
            want = self._score_batch([item], top_k=4, temperature=1.0)[0]
            for a, b in (
                (got.token_logprobs_T, want.token_logprobs_T),
                (got.top_logprobs_T_K, want.top_logprobs_T_K),
            ):
                assert a is not None and b is not None, "scored with top_k = 4"
                diff = max(diff, float(np.max(np.abs(a - b))))
        tolerance = 1e-3 if self.dtype == torch.float32 else 0.1  # 16-bit forwards differ by their rounding
        return None if diff <= tolerance else f"it differs from the full forward by {diff:.3g} nats"

    def _teacher_context(self, item: ScoreItem) -> list[int]:
        # With no context, the first completion token is scored after BOS (validation ensures one exists).
        if item.context_ids:
            return list(item.context_ids)
        assert self.bos_token_id is not None, "validation refuses an empty context without a BOS token"
        return [self.bos_token_id]

    def _teacher_ids(self, item: ScoreItem) -> list[int]:
        return self._teacher_context(item) + list(item.completion_ids)

    # ---- generation (the OpenAI-compatible endpoints) -----------------------------------------------

    def start_generation(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        """params.n samples continuing prompt_ids, computed by the returned Generation's step() calls (each on
        the forward thread, like score()); nothing runs here."""
        return Generation(
            self.model, self.decode, prompt_ids, params, self.eos_token_ids, self._cache_kwarg, self.softcap
        )

    # ---- tokenizer ----------------------------------------------------------------------------------

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each id decoded on its own: how OpenAI and vLLM show tokens in logprobs."""
        return self.tokenizer.batch_decode([[i] for i in ids])

    def tokenize_text(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not self.tokenizer.chat_template:
            raise ValueError("this model's tokenizer has no chat template; send text instead of messages")
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )


def _cache_kwarg(base_model: torch.nn.Module) -> str | None:
    """The name under which this model's forward takes a KV cache, if it takes one."""
    try:
        params = inspect.signature(base_model.forward).parameters
    except (TypeError, ValueError):  # a forward Python cannot introspect: assume it takes none
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _probe_ids(vocab_size: int) -> list[int]:
    """12 ids spread over the vocabulary, for the load-time checks (prefix reuse, the head formula)."""
    return [(7919 * k + 13) % vocab_size for k in range(12)]


def _bos_token_id(tokenizer, config) -> int | None:
    for candidate in (tokenizer.bos_token_id, getattr(config, "bos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return None


def _eos_token_ids(tokenizer, model) -> frozenset[int]:
    """Ids that end a generation: the tokenizer's EOS and the model's generation_config ones."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return frozenset(i for i in ids if isinstance(i, int))


def _weights_sha256(path: Path) -> str:
    """sha256 of the weight files (first 16 hex digits): tells two builds of the same name apart."""
    digest = hashlib.sha256()
    for file in sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")):
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]
