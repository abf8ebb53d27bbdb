"""A prompt's KV cache shared by the completions that continue it (prefix reuse in the HF backend)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class NoPrefixReuse(Exception):
    """The model's cache is not one a prompt can be shared through."""


class SharedPrefixLayer(DynamicLayer):
    """One layer's prompt keys/values, seen by `rows` completions as a view, and never grown.

    update() hands attention prompt + new states but keeps only the prompt: one prompt serves every chunk of
    its group, and no completion keys pile up across layers (the plain forward keeps no cache at all).
    """

    def __init__(self, keys_1_K_P_D: torch.Tensor, values_1_K_P_D: torch.Tensor, rows: int):
        super().__init__()
        self.keys = keys_1_K_P_D.expand(rows, -1, -1, -1)
        self.values = values_1_K_P_D.expand(rows, -1, -1, -1)
        self.device = keys_1_K_P_D.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class SharedPrefixCache(DynamicCache):
    def __init__(self, layers: list[SharedPrefixLayer]):
        Cache.__init__(self, layers=layers)  # DynamicCache.__init__ would copy the prompt into fresh layers


@dataclass
class Prefix:
    """A prompt run once: its last hidden state and every layer's keys/values (batch 1)."""

    last_hidden_1_H: torch.Tensor
    keys_values: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def length(self) -> int:
        return self.keys_values[0][0].shape[-2]

    def cache(self, rows: int) -> Cache:
        return SharedPrefixCache([SharedPrefixLayer(k, v, rows) for k, v in self.keys_values])
