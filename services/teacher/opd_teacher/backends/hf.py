"""White-box teacher on a Hugging Face causal LM: loads the model, runs the forward, scores in chunks."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_client.embedded import resolve_model
from opd_client.schema import ModelInfo
from opd_client.scores import SequenceScores
from opd_client.tokenizer_hash import tokenizer_sha256
from opd_teacher.backends.base import ScoreItem
from opd_teacher.backends.topk import score_hidden

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class HFLimits:
    max_top_k: int = 1024
    max_tokens: int = 65536  # per request, teacher view (context + completion), summed over sequences
    max_sequence_len: int | None = None  # default: the model's max_position_embeddings
    max_batch_tokens: int = 8192  # padded tokens per forward
    score_chunk_tokens: int = 512  # rows of logits materialised at once


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
        self, name: str, model: str, dtype: str = "auto", device: str = "auto", limits: HFLimits = HFLimits()
    ):
        path, source = resolve_model(model)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.limits = limits
        log.info("loading %s from %s (%s, %s)", name, path, self.dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        config = self.model.config
        self.bos_token_id = _bos_token_id(self.tokenizer, config)
        self.pad_token_id = self.tokenizer.pad_token_id or 0
        self.softcap = getattr(config, "final_logit_softcapping", None)
        max_positions = getattr(config, "max_position_embeddings", None) or 1 << 20
        vocab_size = self.model.get_output_embeddings().weight.shape[0]
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
        )

    # ---- scoring ------------------------------------------------------------------------------------

    def score(self, items: list[ScoreItem], top_k: int, temperature: float) -> list[SequenceScores]:
        results: list[SequenceScores | None] = [None] * len(items)
        for batch_idx in self._micro_batches(items):
            scored = self._score_batch([items[i] for i in batch_idx], top_k, temperature)
            for i, scores in zip(batch_idx, scored, strict=True):
                results[i] = scores
        return results  # type: ignore[return-value]

    def _micro_batches(self, items: list[ScoreItem]) -> list[list[int]]:
        """Indices grouped by length so padding stays small, each under max_batch_tokens padded tokens."""
        order = sorted(range(len(items)), key=lambda i: self._forward_len(items[i]))
        batches, current = [], []
        for i in order:
            longest = self._forward_len(items[i])  # sorted ascending: the newest is the longest
            if current and longest * (len(current) + 1) > self.limits.max_batch_tokens:
                batches.append(current)
                current = []
            current.append(i)
        return batches + [current] if current else batches

    def _forward_len(self, item: ScoreItem) -> int:
        return max(len(item.context_ids), 1) + len(item.completion_ids)

    @torch.inference_mode()
    def _score_batch(self, items: list[ScoreItem], top_k: int, temperature: float) -> list[SequenceScores]:
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
        picks, targets, score_ids = [], [], []
        for b, (item, ids) in enumerate(zip(items, rows, strict=True)):
            start = len(ids) - len(item.completion_ids)
            picks.append(hidden_B_L_H[b, start - 1 : len(ids) - 1])
            targets.extend(item.completion_ids)
            if item.score_ids_T_M is not None:
                score_ids.append(torch.as_tensor(item.score_ids_T_M, dtype=torch.long))
            else:  # placeholder rows keep the blocks aligned when only some items ask for score ids
                score_ids.append(torch.zeros((len(item.completion_ids), 1), dtype=torch.long))
        hidden_N_H = torch.cat(picks)
        has_score_ids = any(item.score_ids_T_M is not None for item in items)
        out = score_hidden(
            hidden_N_H,
            self.model.get_output_embeddings(),
            torch.tensor(targets, dtype=torch.long),
            top_k=top_k,
            temperature=temperature,
            score_ids_N_M=_pad_cat(score_ids) if has_score_ids else None,
            chunk_tokens=self.limits.score_chunk_tokens,
            softcap=self.softcap,
        )
        return _split(out, [len(item.completion_ids) for item in items], items)

    def _teacher_ids(self, item: ScoreItem) -> list[int]:
        # With no context, the first completion token is scored after BOS (validation ensures one exists).
        context = item.context_ids or [self.bos_token_id]
        return list(context) + list(item.completion_ids)

    # ---- tokenizer ----------------------------------------------------------------------------------

    def tokenize_text(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not self.tokenizer.chat_template:
            raise ValueError("this model's tokenizer has no chat template; send text instead of messages")
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )


def _pad_cat(score_ids: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [T_i, M_i] id blocks into [N, max M], padding with id 0 (sliced off in _split)."""
    width = max(s.shape[1] for s in score_ids)
    return torch.cat([torch.nn.functional.pad(s, (0, width - s.shape[1])) for s in score_ids])


def _split(out: dict[str, torch.Tensor], lengths: list[int], items: list[ScoreItem]) -> list[SequenceScores]:
    arrays = {k: v.numpy() for k, v in out.items()}
    results, start = [], 0
    for n, item in zip(lengths, items, strict=True):
        rows = slice(start, start + n)
        score_lp = None
        if item.score_ids_T_M is not None:
            score_lp = np.ascontiguousarray(arrays["score_logprobs"][rows, : item.score_ids_T_M.shape[1]])
        results.append(
            SequenceScores(
                token_logprobs_T=arrays["token_logprobs"][rows],
                top_ids_T_K=arrays["top_ids"][rows],
                top_logprobs_T_K=arrays["top_logprobs"][rows],
                tail_logprob_T=arrays["tail_logprobs"][rows],
                score_logprobs_T_M=score_lp,
            )
        )
        start += n
    return results


def _bos_token_id(tokenizer, config) -> int | None:
    for candidate in (tokenizer.bos_token_id, getattr(config, "bos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return None


def _weights_sha256(path: Path) -> str:
    """sha256 of the weight files (first 16 hex digits): tells two builds of the same name apart."""
    digest = hashlib.sha256()
    for file in sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")):
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]
