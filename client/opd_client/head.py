"""A teacher's output head and the one definition of how its hidden states become logits.

With `score(..., return_hidden=True)` a trainer gets the teacher's final hidden state h [T, D] per completion
position; with the head (`client.teacher_head()`, GET /v1/models/{name}/head) it gets the teacher's exact
full distribution, V logits per position, from D numbers on the wire:

    logits = (h · weightᵀ + bias) · logit_scale         (bias only if the model has one)
    logits = tanh(logits / c) · c                        when final_logit_softcapping = c (Gemma 2)
    logits = logits / temperature
    logprobs = log_softmax(logits)

The service computes its own logprobs with `finish_logits` too (opd_teacher.backends.topk.logprobs_of), so
the two can never disagree on the definition. Imports torch: the rest of opd_client does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load

from opd_client.schema import ModelInfo


@dataclass(frozen=True)
class TeacherHead:
    """A teacher's output head as served (weight in the model's dtype as loaded) and its logit transform."""

    model: str
    weight_V_D: torch.Tensor
    bias_V: torch.Tensor | None
    logit_scale: float
    final_logit_softcapping: float | None
    tokenizer_vocab_size: int | None  # rows from here to V are padding the tokenizer never emits
    sha256: str

    @property
    def vocab_size(self) -> int:
        return int(self.weight_V_D.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight_V_D.shape[1])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TeacherHead:
        """The same head on `device` (and in `dtype`, e.g. a trainer's bf16 matmul on GPU)."""
        weight = self.weight_V_D.to(device=device, dtype=dtype or self.weight_V_D.dtype)
        bias = (
            None if self.bias_V is None else self.bias_V.to(device=device, dtype=dtype or self.bias_V.dtype)
        )
        return TeacherHead(
            self.model,
            weight,
            bias,
            self.logit_scale,
            self.final_logit_softcapping,
            self.tokenizer_vocab_size,
            self.sha256,
        )


def load_head(source: bytes | str | Path, info: ModelInfo) -> TeacherHead:
    """The head in safetensors bytes or a file (tensors "weight" [V, D] and optionally "bias" [V]), with the
    logit transform of `info` (the teacher's /v1/models record).

    Read into memory, not memory-mapped: a file rewritten in place later must not change a loaded head.
    """
    path = "<bytes>" if isinstance(source, bytes) else source
    tensors = load(source if isinstance(source, bytes) else Path(source).read_bytes())
    unknown = set(tensors) - {"weight", "bias"}
    if "weight" not in tensors or unknown:
        raise ValueError(f"{path}: a head holds 'weight' and optionally 'bias'; found {sorted(tensors)}")
    weight = tensors["weight"]
    if weight.ndim != 2 or (info.hidden_size is not None and weight.shape[1] != info.hidden_size):
        raise ValueError(
            f"{path}: weight is {list(weight.shape)}; expected [V, {info.hidden_size}] for {info.name!r}"
        )
    return TeacherHead(
        model=info.name,
        weight_V_D=weight,
        bias_V=tensors.get("bias"),
        logit_scale=info.logit_scale,
        final_logit_softcapping=info.final_logit_softcapping,
        tokenizer_vocab_size=info.tokenizer_vocab_size,
        sha256=info.head_sha256 or "",
    )


def finish_logits(
    raw_logits_N_V: torch.Tensor,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """fp32 logits from the head's output h · weightᵀ + bias: scaled, soft-capped, divided by temperature."""
    logits_N_V = raw_logits_N_V.float()
    if logit_scale != 1.0:  # Cohere's logit_scale, Granite's 1 / logits_scaling
        logits_N_V = logits_N_V * logit_scale
    if softcap:  # Gemma-style final logit soft-capping
        logits_N_V = torch.tanh(logits_N_V / softcap) * softcap
    if temperature != 1.0:
        logits_N_V = logits_N_V / temperature
    return logits_N_V


def logits_from_hidden(
    hidden_N_D: torch.Tensor | object, head: TeacherHead, temperature: float = 1.0
) -> torch.Tensor:
    """The teacher's fp32 logits [N, V] for hidden states [N, D] (a tensor or a numpy array such as
    SequenceScores.hidden_T_D), computed in fp32 on the head's device."""
    weight = head.weight_V_D
    hidden = torch.as_tensor(hidden_N_D).to(device=weight.device, dtype=torch.float32)
    raw_N_V = hidden @ weight.float().T
    if head.bias_V is not None:
        raw_N_V = raw_N_V + head.bias_V.float()
    return finish_logits(raw_N_V, head.logit_scale, head.final_logit_softcapping, temperature)


def logprobs_from_hidden(
    hidden_N_D: torch.Tensor | object, head: TeacherHead, temperature: float = 1.0
) -> torch.Tensor:
    """The teacher's full fp32 log-distribution [N, V] over its vocabulary (padded rows included: their
    probability is whatever the model gives them, normally ~0)."""
    return torch.log_softmax(logits_from_hidden(hidden_N_D, head, temperature), dim=-1)
