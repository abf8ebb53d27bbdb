"""Removing whole decoder layers from a causal LM, and choosing which ones by measured harm.

Harm of a set of kept layers = mean per-token KL(teacher ‖ pruned) over the completion tokens of a fixed
held-out batch (full vocabulary, exact). The teacher's log-probs are computed once. During the search no
weights are copied: the model's layer list is swapped for the kept layers. Greedy rounds also reuse the
unchanged prefix: removing layer K[j] leaves layers K[0..j-1] as they were, so the candidate runs from the
hidden state that enters K[j] (fed as `inputs_embeds`) through K[j+1..] only — half the work, same result.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # the models come in built; this module needs no transformers import of its own
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class HeldOut:
    """A left-padded batch of prompt + completion; the last `completion_len` columns are the completion."""

    input_ids_B_L: torch.Tensor
    attention_mask_B_L: torch.Tensor
    completion_mask_B_C: torch.Tensor  # 1 on real completion tokens (through the first EOS), 0 on padding
    completion_len: int

    @property
    def position_ids_B_L(self) -> torch.Tensor:
        # As generate() numbers them: left padding does not shift the real tokens' positions.
        return (self.attention_mask_B_L.cumsum(-1) - 1).clamp(min=0)


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder layer list of a Llama-family causal LM (`model.model.layers`)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no model.model.layers ModuleList; cannot remove layers")
    return layers


def _set_layer_view(model: PreTrainedModel, layers: nn.ModuleList, layer_types: list | None) -> None:
    """Point the model at `layers`, numbering their attention modules 0.. for the KV cache."""
    model.model.layers = layers
    for new_idx, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx
    model.config.num_hidden_layers = len(layers)
    if layer_types is not None:
        model.config.layer_types = layer_types


@contextlib.contextmanager
def kept_layers_view(model: PreTrainedModel, kept: list[int]) -> Iterator[PreTrainedModel]:
    """Temporarily run `model` with only the layers at indices `kept` (of its current list)."""
    full = decoder_layers(model)
    full_types = getattr(model.config, "layer_types", None)
    full_count = model.config.num_hidden_layers
    kept_types = [full_types[i] for i in kept] if full_types is not None else None
    _set_layer_view(model, nn.ModuleList([full[i] for i in kept]), kept_types)
    try:
        yield model
    finally:
        _set_layer_view(model, full, full_types)
        model.config.num_hidden_layers = full_count


def build_pruned_model(teacher: PreTrainedModel, kept: list[int]) -> PreTrainedModel:
    """A fresh model with `len(kept)` layers whose weights are copied from the teacher's kept layers."""
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in kept]
    new_index = {old: new for new, old in enumerate(kept)}
    state = {}
    for key, tensor in teacher.state_dict().items():
        if key.startswith("model.layers."):
            old = int(key.split(".")[2])
            if old not in new_index:
                continue
            key = key.replace(f"model.layers.{old}.", f"model.layers.{new_index[old]}.", 1)
        state[key] = tensor
    dtype = next(teacher.parameters()).dtype
    student = type(teacher)(config).to(dtype=dtype)
    student.load_state_dict(state, strict=True)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.to(next(teacher.parameters()).device).eval()


class HarmMeter:
    """KL(teacher ‖ model with some layers removed) on one held-out batch; the teacher side is cached."""

    def __init__(self, model: PreTrainedModel, held_out: HeldOut):
        self.model = model.eval()
        self.head = model.get_output_embeddings()
        self.n_layers = len(decoder_layers(model))
        device = next(model.parameters()).device
        self.input_ids_B_L = held_out.input_ids_B_L[:, :-1].to(device)  # the last token predicts nothing
        self.attention_mask_B_L = held_out.attention_mask_B_L[:, :-1].to(device)
        self.position_ids_B_L = held_out.position_ids_B_L[:, :-1].to(device)
        self.mask_B_C = held_out.completion_mask_B_C.to(device=device, dtype=torch.float32)
        self.completion_len = held_out.completion_len
        self.evaluations = 0
        self._check_head_is_plain()
        probs_B_C_V, neg_entropy_B_C = [], []
        for hidden_C_H in self._completion_hidden(list(range(self.n_layers))):
            logprobs_C_V = self._row_logprobs(hidden_C_H)
            probs_B_C_V.append(logprobs_C_V.exp())
            # Σ_v p log p per position: the half of the KL that does not depend on the candidate.
            neg_entropy_B_C.append((probs_B_C_V[-1] * logprobs_C_V).sum(-1))
        self.teacher_probs_B_C_V = torch.stack(probs_B_C_V)
        self.teacher_neg_entropy_B_C = torch.stack(neg_entropy_B_C)
        self.reuse_prefix = self._inputs_embeds_is_identity()
        self.evaluations = 0  # count candidates only, not the teacher and the checks above

    @torch.no_grad()
    def kl(self, kept: list[int]) -> float:
        """Mean per-token KL(teacher ‖ model with only `kept` layers) over the completion tokens."""
        return self._kl_of(self._completion_hidden(kept))

    @torch.no_grad()
    def kl_of_each_removal(self, kept: list[int]) -> dict[int, float]:
        """{layer: KL with `kept` minus that layer}, for every layer in `kept`."""
        if not self.reuse_prefix:
            return {layer: self.kl([k for k in kept if k != layer]) for layer in kept}
        inputs_J_B_L_H = self._layer_inputs(kept)
        return {
            layer: self._kl_of(self._completion_hidden(kept[j + 1 :], inputs_embeds=inputs_J_B_L_H[j]))
            for j, layer in enumerate(kept)
        }

    def _kl_of(self, hidden_B_C_H: torch.Tensor) -> float:
        # One sequence at a time: its logits (C × V, ~9 MB) come back from the heap on every call, while the
        # whole batch's (~75 MB) would be fresh pages each time (page faults cost ~15% of the search).
        kl_sum = torch.zeros((), device=hidden_B_C_H.device)
        for b, hidden_C_H in enumerate(hidden_B_C_H):
            cross_C = (self.teacher_probs_B_C_V[b] * self._row_logprobs(hidden_C_H)).sum(-1)
            kl_sum += ((self.teacher_neg_entropy_B_C[b] - cross_C) * self.mask_B_C[b]).sum()
        return float(kl_sum / self.mask_B_C.sum())

    def _row_logprobs(self, hidden_C_H: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.head(hidden_C_H).float(), dim=-1)

    @torch.no_grad()
    def _completion_hidden(
        self, layers: list[int], inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final hidden states (after the last norm) at the positions that predict the completion tokens."""
        self.evaluations += 1
        inputs = (
            {"input_ids": self.input_ids_B_L} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
        )
        with kept_layers_view(self.model, layers):
            hidden_B_L_H = self.model.model(
                **inputs,
                attention_mask=self.attention_mask_B_L,
                position_ids=self.position_ids_B_L,
                use_cache=False,
            ).last_hidden_state
        return hidden_B_L_H[:, -self.completion_len :]

    @torch.no_grad()
    def _layer_inputs(self, kept: list[int]) -> list[torch.Tensor]:
        """The hidden state entering each kept layer, from one forward of the model with `kept` layers."""
        inputs_J_B_L_H: list[torch.Tensor] = []

        def record(_module, args, kwargs):
            inputs_J_B_L_H.append(args[0] if args else kwargs["hidden_states"])

        with kept_layers_view(self.model, kept):
            hooks = [
                layer.register_forward_pre_hook(record, with_kwargs=True) for layer in self.model.model.layers
            ]
            try:
                self.model.model(
                    input_ids=self.input_ids_B_L,
                    attention_mask=self.attention_mask_B_L,
                    position_ids=self.position_ids_B_L,
                    use_cache=False,
                )
            finally:
                for hook in hooks:
                    hook.remove()
        return inputs_J_B_L_H

    @torch.no_grad()
    def _check_head_is_plain(self) -> None:
        """The meter computes logits as head(final hidden state); make sure that is what the model does
        (true for the Llama family; not for models that soft-cap or scale logits)."""
        two = list(range(min(2, self.n_layers)))
        with kept_layers_view(self.model, two):
            logits_B_L_V = self.model(
                input_ids=self.input_ids_B_L[:1],
                attention_mask=self.attention_mask_B_L[:1],
                position_ids=self.position_ids_B_L[:1],
                use_cache=False,
            ).logits
            hidden_B_L_H = self.model.model(
                input_ids=self.input_ids_B_L[:1],
                attention_mask=self.attention_mask_B_L[:1],
                position_ids=self.position_ids_B_L[:1],
                use_cache=False,
            ).last_hidden_state
        if not torch.allclose(self.head(hidden_B_L_H), logits_B_L_V, rtol=1e-4, atol=1e-4):
            raise NotImplementedError(
                f"{type(self.model).__name__}: logits are not lm_head(final hidden state); layer pruning "
                "supports Llama-family causal LMs"
            )

    @torch.no_grad()
    def _inputs_embeds_is_identity(self) -> bool:
        """Prefix reuse is exact only if the model feeds `inputs_embeds` to layer 0 unchanged (Llama does;
        Gemma, for one, scales them) — checked once instead of trusted per architecture."""
        embeds_B_L_H = self.model.get_input_embeddings()(self.input_ids_B_L)
        two = list(range(min(2, self.n_layers)))
        from_ids = self._completion_hidden(two)
        from_embeds = self._completion_hidden(two, inputs_embeds=embeds_B_L_H)
        return torch.allclose(from_ids, from_embeds, rtol=1e-5, atol=1e-6)


@dataclass
class Removal:
    """The outcome of a search: layers removed in order, and the KL after each removal."""

    kept: list[int]
    removed: list[int]
    kl_after_each_removal: list[float]


RoundCallback = Callable[[int, int, float, float], None]  # (round, removed layer, kl, elapsed s)


def greedy_removal(meter: HarmMeter, keep: int, on_round: RoundCallback | None = None) -> Removal:
    """Remove, one at a time, the layer whose removal gives the lowest KL, re-evaluating every remaining
    layer each round, until `keep` layers remain. Ties go to the lower index."""
    _check_keep(meter, keep)
    started = time.perf_counter()
    kept = list(range(meter.n_layers))
    removed, kls = [], []
    while len(kept) > keep:
        kl_by_layer = meter.kl_of_each_removal(kept)
        layer = min(kept, key=lambda i: (kl_by_layer[i], i))
        kept.remove(layer)
        removed.append(layer)
        kls.append(kl_by_layer[layer])
        if on_round:
            on_round(len(removed), layer, kls[-1], time.perf_counter() - started)
    return Removal(kept, removed, kls)


def ranked_removal(meter: HarmMeter, keep: int, on_round: RoundCallback | None = None) -> Removal:
    """Rank layers once by the KL of removing each alone, then remove the least harmful ones in that order
    (measuring the KL after each cumulative removal for the record)."""
    _check_keep(meter, keep)
    started = time.perf_counter()
    full = list(range(meter.n_layers))
    kl_by_layer = meter.kl_of_each_removal(full)
    order = sorted(full, key=lambda i: (kl_by_layer[i], i))[: meter.n_layers - keep]
    kls = []
    for n, layer in enumerate(order, start=1):
        kls.append(meter.kl([k for k in full if k not in order[:n]]))
        if on_round:
            on_round(n, layer, kls[-1], time.perf_counter() - started)
    return Removal([k for k in full if k not in order], order, kls)


def kl_after_each_removal(meter: HarmMeter, removed: list[int]) -> list[float]:
    """The KL after removing removed[:1], removed[:2], ... (to re-measure a search's result exactly)."""
    full = list(range(meter.n_layers))
    return [meter.kl([k for k in full if k not in removed[:n]]) for n in range(1, len(removed) + 1)]


STRATEGIES = {"greedy": greedy_removal, "ranked": ranked_removal}


def _check_keep(meter: HarmMeter, keep: int) -> None:
    if not 1 <= keep <= meter.n_layers:
        raise ValueError(f"layers to keep must be in 1..{meter.n_layers} (the teacher's layers), got {keep}")
