"""What a step does besides the teacher signal's loss: options acting on the gradient before clipping and on
the model after the optimizer step. Built once per run; the loop calls three hooks and never asks which
option is on. With all of them off every hook does nothing, so runs are as before, bit for bit.

- before_clip  lm_coef: mix a next-token loss on a text set into the step (lm_mix.py);
               update_mask: zero the gradients of the coordinates a mask freezes (update_mask.py)
- after_step   effopd: after the probe steps, freeze the modules that moved least (module_allocation.py)
- resume       effopd: a resumed run freezes what it decided before
"""

from __future__ import annotations

from pathlib import Path

import torch

from opd_student.methods.lm_mix import LMLossMix, load_lm_texts
from opd_student.methods.module_allocation import ModuleAllocation
from opd_student.methods.update_mask import UpdateMask


class StepExtras:
    def __init__(
        self,
        lm_mix: LMLossMix | None = None,
        mask: UpdateMask | None = None,
        allocation: ModuleAllocation | None = None,
        micro_batch_size: int = 1,
        student=None,
    ) -> None:
        self.lm_mix, self.mask, self.allocation = lm_mix, mask, allocation
        self.micro_batch_size, self.student = micro_batch_size, student

    @classmethod
    def build(cls, cfg, student, run_dir: Path) -> StepExtras:
        world = student.world
        if (cfg.update_mask or cfg.effopd) and world.distributed:
            raise SystemExit(
                "error: update_mask and effopd act on whole parameters of one process; run them without torchrun"
            )
        named = list(student.trainable.named_parameters())
        lm_mix = None
        if cfg.lm_coef > 0:
            texts = load_lm_texts(cfg.lm_data, student.tokenizer, cfg.lm_max_tokens)
            lm_mix = LMLossMix(cfg.lm_coef, texts, cfg.lm_batch_size, cfg.seed)
        mask = UpdateMask(cfg.update_mask, named) if cfg.update_mask else None
        allocation = None
        if cfg.effopd:
            allocation = ModuleAllocation(
                named, student.path, run_dir, cfg.effopd_probe_steps, cfg.effopd_keep_fraction
            )
        return cls(lm_mix, mask, allocation, cfg.micro_batch_size, student)

    def resume(self, step: int) -> None:
        if self.allocation is not None:
            self.allocation.resume(step)

    def before_clip(self, params: list[torch.nn.Parameter], step_index: int) -> dict[str, float]:
        """After the signal's gradients are complete (finish_gradients), before clipping."""
        metrics: dict[str, float] = {}
        if self.lm_mix is not None:
            metrics |= self.lm_mix.add_gradients(self.student, params, step_index, self.micro_batch_size)
        if self.mask is not None:
            metrics |= self.mask.apply(params)
        return metrics

    def after_step(self, step: int) -> dict[str, float]:
        """After optimizer step `step` (1-based)."""
        if self.allocation is None:
            return {}
        return self.allocation.after_step(step, self.student.world.is_main)
