"""What `opd make-steering-vector` writes and `opd serve-teacher --steering-vector` reads, and where in a
model both act: one definition for the two sides (the student and teacher packages share no other code)."""

from __future__ import annotations

import torch

VECTOR_FORMAT = "opd-steering-vector-v1"  # the file's metadata "format"
VECTOR_NAME = "steering_vector"  # its one tensor, [H]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder stack of an HF causal LM (Llama-style `layers`, GPT-2-style `h`)."""
    base = getattr(model, "base_model", model)
    for name in ("layers", "h"):
        layers = getattr(base, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ValueError(f"{type(model).__name__}: no decoder layer stack found (looked for .layers and .h)")
