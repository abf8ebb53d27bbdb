"""The teacher's output head as trainers download it (GET /v1/models/{name}/head, gRPC GetHead).

A trainer given the teacher's final hidden states (return_hidden) and this head computes the teacher's full
distribution with opd_client.head.logits_from_hidden:

    logits = (h · weightᵀ + bias) · logit_scale, then tanh(x / c) · c with c = final_logit_softcapping

The bytes are `safetensors.torch.save({"weight": W [V, D], "bias": b [V] if any})` with W in the model's
dtype as loaded (the weights the service itself multiplies by; an fp32 copy of bf16 weights would carry no
more information at twice the size). They are built once at load, held in host memory (V·D·itemsize:
113 MB for the default fp32 teacher) and hashed; head_sha256 is of exactly the bytes served.

At load a short forward checks that the formula reproduces the model's own logits (model(ids).logits).
A model whose forward does something else to its logits than the formula knows (a scale under another
config name, a bias added outside the head, ...) serves no hidden states rather than wrong ones.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save

from opd_client.head import finish_logits

if TYPE_CHECKING:  # hf.py loads the model; this module only reads it
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

# Hidden states of one request, summed over its sequences, as they travel (scored tokens × D × 2 or 4 bytes);
# published as ModelInfo.max_hidden_bytes. Under gRPC's 256 MiB message limit with room for the logprobs
# beside them, and a bound on what one request holds in the service's memory: 128 MiB is 58k scored tokens
# of the default teacher (D = 576) in float32, 8k tokens of a D = 8192 teacher in bfloat16.
MAX_HIDDEN_BYTES = 128 * 2**20
HEAD_CHUNK_BYTES = 1 << 22  # HTTP streaming pieces (gRPC sends smaller ones: grpc_server.HEAD_CHUNK_BYTES)
# Unit roundoff of the model's dtype: the load check's tolerance is a few roundings of the largest logit.
_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@dataclass(frozen=True)
class HeadExport:
    data: bytes  # the safetensors file
    sha256: str
    hidden_size: int  # D
    vocab_size: int  # V, rows of weight (may exceed len(tokenizer): padding)
    logit_scale: float
    final_logit_softcapping: float | None

    def chunks(self, size: int = HEAD_CHUNK_BYTES) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) pieces of the file, in order."""
        for start in range(0, len(self.data), size):
            yield start, self.data[start : start + size]


def logit_scale_of(config) -> float:
    """The factor the model's forward multiplies its head's output by (1.0 for most models)."""
    scale = getattr(config, "logit_scale", None)  # Cohere, Cohere 2: logits * logit_scale
    if isinstance(scale, int | float) and not isinstance(scale, bool):
        return float(scale)
    scaling = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if isinstance(scaling, int | float) and not isinstance(scaling, bool) and scaling:
        return 1.0 / float(scaling)
    return 1.0


def softcap_of(config) -> float | None:
    """Gemma 2's final_logit_softcapping c (logits -> tanh(logits / c) · c), else None."""
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def export_head(model: PreTrainedModel, probe_ids: list[int]) -> tuple[HeadExport | None, str | None]:
    """(the head, None), or (None, why not) when the formula does not give this model's logits on probe_ids."""
    lm_head = model.get_output_embeddings()
    weight = getattr(lm_head, "weight", None)
    if not isinstance(lm_head, torch.nn.Linear) or weight is None:
        return None, f"its output head is a {type(lm_head).__name__}, not a Linear layer"
    scale, cap = logit_scale_of(model.config), softcap_of(model.config)
    why_not = check_formula(model, scale, cap, probe_ids)
    if why_not:
        return None, why_not
    return head_from_tensors(weight, lm_head.bias, scale, cap), None


def head_from_tensors(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: float, cap: float | None
) -> HeadExport:
    """The served bytes of a head with these tensors (also after a live weight update changed them)."""
    tensors = {"weight": weight.detach().to("cpu").contiguous()}
    if bias is not None:
        tensors["bias"] = bias.detach().to("cpu").contiguous()
    data = save(tensors)
    return HeadExport(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        hidden_size=int(weight.shape[1]),
        vocab_size=int(weight.shape[0]),
        logit_scale=scale,
        final_logit_softcapping=cap,
    )


@torch.inference_mode()
def check_formula(
    model: PreTrainedModel, scale: float, cap: float | None, probe_ids: list[int]
) -> str | None:
    """None if finish_logits(head(base_model(ids).last_hidden_state)) equals model(ids).logits, else why not.

    The model applies scale and cap in its own dtype, we in fp32 after one rounding of the head's output:
    each of the at most 4 operations (product, division, tanh, product) rounds once, by at most the unit
    roundoff u of the model's dtype relative to a value no larger than max |logit| (tanh's output is
    bounded by 1), so the two differ by at most ~5u·(1 + max |logit|); 8u leaves a margin.
    """
    device = model.get_output_embeddings().weight.device
    ids_1_L = torch.tensor([probe_ids], device=device)
    try:  # a model we know nothing about may fail in any way here; that only means no hidden states
        want_L_V = model(input_ids=ids_1_L).logits[0].float()
        hidden_L_D = model.base_model(input_ids=ids_1_L).last_hidden_state[0]
        got_L_V = finish_logits(model.get_output_embeddings()(hidden_L_D), scale, cap)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    if got_L_V.shape != want_L_V.shape:
        return f"head(last_hidden_state) is {list(got_L_V.shape)}, the model's logits {list(want_L_V.shape)}"
    u = _UNIT_ROUNDOFF.get(model.dtype, 2.0**-8)
    tolerance = 8 * u * (1.0 + float(want_L_V.abs().max()))
    diff = float((got_L_V - want_L_V).abs().max())
    if not diff <= tolerance:  # also catches NaN
        return (
            f"(h · Wᵀ + b) · {scale:g}{f' soft-capped at {cap:g}' if cap else ''} differs from the model's "
            f"logits by {diff:.3g} (tolerance {tolerance:.3g})"
        )
    return None
