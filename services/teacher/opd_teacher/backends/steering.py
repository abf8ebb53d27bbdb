"""Activation steering: a teacher whose residual stream gets a vector added after one decoder layer.

SafeSteer (Li et al. 2026, *SafeSteer: Localized On-Policy Distillation for Efficient Safety Alignment*,
arXiv 2606.02530) builds its safety teacher from the student itself "via activation steering", then distils
the student towards it on a sparse set of tokens. Here the service applies the steering to every model it
serves: the output of decoder layer ℓ becomes h + α·v at every position (prompt and completion), so every
answer (scores, hidden states, generations) is the steered model's. The vector comes from
`opd make-steering-vector` (the mean activation difference of two prompt sets at that layer's output); the
file says at which layer it was measured. With no vector nothing is attached and the model is untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

import torch

from opd_common.steering_format import VECTOR_FORMAT, VECTOR_NAME, decoder_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SteeringOptions:
    """`opd serve-teacher`'s steering flags are generated from these fields (each comment is the --help)."""

    # a .safetensors from opd make-steering-vector: added to the residual stream of every model served
    steering_vector: str | None = None
    steering_layer: int | None = (
        None  # 0-based decoder layer whose output gets the vector (default: the file's)
    )
    steering_scale: float = 1.0  # α: the layer's output h becomes h + α·v


@dataclass(frozen=True)
class SteeringVector:
    vector_H: torch.Tensor
    layer: int
    metadata: dict[str, str]


def read_vector(path: str) -> SteeringVector:
    """The vector and the layer it was measured at; anything else is refused with the reason."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            names = list(handle.keys())
            vector = handle.get_tensor(VECTOR_NAME) if VECTOR_NAME in names else None
    except (OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"--steering-vector {path}: cannot read it ({e})") from None
    if metadata.get("format") != VECTOR_FORMAT or vector is None or vector.dim() != 1:
        raise ValueError(
            f"--steering-vector {path}: not a steering vector written by opd make-steering-vector "
            f"(tensors {names}, metadata {metadata})"
        )
    return SteeringVector(vector, int(metadata["layer"]), metadata)


def attach_steering(model: torch.nn.Module, options: SteeringOptions | None, name: str = "") -> str | None:
    """Add α·v to the output of the chosen decoder layer (a forward hook); a description, or None when off."""
    if options is None or not options.steering_vector:
        return None
    steering = read_vector(options.steering_vector)
    layer = steering.layer if options.steering_layer is None else options.steering_layer
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"--steering-layer {layer}: the model has decoder layers 0..{len(layers) - 1}")
    hidden = cast(Any, model).get_input_embeddings().weight.shape[1]  # an HF PreTrainedModel
    if steering.vector_H.shape[0] != hidden:
        raise ValueError(
            f"--steering-vector {options.steering_vector}: {steering.vector_H.shape[0]} numbers, the model's "
            f"hidden size is {hidden}"
        )
    param = next(model.parameters())
    delta_H = (options.steering_scale * steering.vector_H.to(torch.float64)).to(param.dtype).to(param.device)

    def add_vector(module, args, output):
        if isinstance(output, tuple):  # layers that also return attention weights or a cache
            return (output[0] + delta_H, *output[1:])
        return output + delta_H

    layers[layer].register_forward_hook(add_vector)
    described = (
        f"steering: decoder layer {layer} output + {options.steering_scale:g}·v, ‖v‖ = "
        f"{float(steering.vector_H.norm()):.4g} ({options.steering_vector})"
    )
    log.info("%s: %s", name, described)
    return described
