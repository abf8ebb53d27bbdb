"""A reduced-precision copy of the student for sampling rollouts (`rollout_dtype = "bfloat16"`).

Decoding reads every weight once per step, so on a CPU it is bound by memory bandwidth and by the
small-row matmuls, the head's above all; bf16 weights halve the bytes and run the 8-row matmuls on the
bf16 units (docs/benchmarks.md, "This machine's limits"). Autocast would re-cast the fp32 weights at every
decoding step, so the copy holds bf16 parameters and is refreshed from the master weights before each
sampling call (one copy of the parameters, ~0.1 s for the default student). Buffers (the rotary
frequencies) stay in their own dtype. The training forward and the optimiser keep the full-precision
weights: only which tokens get sampled changes, as measured by `opd bench rollouts`.
"""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel


class SamplingCopy:
    def __init__(self, lm: PreTrainedModel, dtype: torch.dtype = torch.bfloat16) -> None:
        self.source = lm
        self.copy = copy.deepcopy(lm).eval().requires_grad_(False)
        for p in self.copy.parameters():
            p.data = p.data.to(dtype)
        # generate's first step runs the head on the last position of the prompt, a non-contiguous [B, 1, D]
        # slice; for that input a bf16 linear takes torch's batched path and expands the weight to [B, D, V]
        # (a 450 MB copy for the default student, 1.7 s of a 3.3 s generate call, measured with
        # torch.profiler). A contiguous [B, 1, D] goes to one matmul.
        self.copy.get_output_embeddings().register_forward_pre_hook(_contiguous_input)

    @torch.no_grad()
    def refreshed(self) -> torch.nn.Module:
        """The copy, holding the source's current weights."""
        for dst, src in zip(self.copy.parameters(), self.source.parameters(), strict=True):
            dst.copy_(src)
        return self.copy


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])
