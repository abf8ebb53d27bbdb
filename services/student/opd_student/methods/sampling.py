"""How a step's rollouts are made when a method needs more than the student's plain samples: the sampling
policy's logprobs recorded with each rollout (off-policy correction), a behaviour blend with the teacher
early in training (TRB, methods/behaviour_blend.py), or rollouts refined by the teacher's continuation from
their first failing token (TRD, methods/refine.py), or Draft-OPD's target-assisted rollouts
(methods/draft_rollouts.py). BatchSource calls `rollouts` in place of its own
sampling when a run has one of these on (`make_sampler` is None otherwise, and nothing changes).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from opd_student.config import TrainConfig
from opd_student.methods import refine
from opd_student.methods.behaviour_blend import BlendedGumbel, budget
from opd_student.methods.draft_rollouts import DraftRollouts
from opd_student.prompts import Prompt
from opd_student.rollout_factory import RolloutFactory
from opd_student.rollouts import Rollout, row_seed
from opd_student.student_model import Student
from opd_student.teacher_link import TeacherLink

_TRD_STREAM = 7  # row_seed's second key for TRD's teacher continuations (0: the student's own samples)


class MethodSampler:
    def __init__(
        self, cfg: TrainConfig, student: Student, factory: RolloutFactory, link: TeacherLink
    ) -> None:
        self.cfg, self.student, self.factory, self.link = cfg, student, factory, link

    def rollouts(
        self,
        prompts: list[Prompt],
        prompt_ids: list[list[int]],
        row_seeds: list[int],
        index: int,
        horizon: int,
    ) -> tuple[list[Rollout], dict[str, Any]]:
        """The step's rollouts (prompt-major, G per prompt) and what making them cost (metrics)."""
        cfg, G = self.cfg, self.cfg.samples_per_prompt
        if cfg.draft_opd:
            return DraftRollouts(cfg, self.student, self.factory, self.link).rollouts(
                prompts, prompt_ids, index, horizon
            )
        metrics: dict[str, Any] = {}
        epsilon = budget(index, cfg.trb_epsilon, cfg.trb_steps) if cfg.trb_epsilon > 0 else 0.0
        record = cfg.off_policy_correction != "off" or epsilon > 0
        logprobs: list[list[float]] | None = [] if record else None
        processor = None
        if epsilon > 0:
            rows = [(p, ids) for p, ids in zip(prompts, prompt_ids, strict=True) for _ in range(G)]
            processor = self._blend(rows, row_seeds, epsilon)
        completions_P_G = self.student.sample(
            prompt_ids, G, horizon, cfg.temperature, row_seeds, logprobs_out=logprobs, processor=processor
        )
        made = self.factory.rollouts(prompts, prompt_ids, completions_P_G)
        if logprobs is not None:
            made = [
                dataclasses.replace(r, behaviour_logprobs=lp) for r, lp in zip(made, logprobs, strict=True)
            ]
        if cfg.trb_epsilon > 0:
            metrics["trb/epsilon"] = epsilon
            beta_count = processor.beta_count if processor is not None else 0
            metrics["trb/beta_mean"] = processor.beta_sum / beta_count if processor and beta_count else 0.0
            metrics["teacher/sampling_positions"] = processor.teacher_positions if processor else 0
        if cfg.trd:
            made, trd_metrics = self._refine(made, row_seeds, index, horizon)
            metrics.update(trd_metrics)
            metrics["teacher/sampling_positions"] = (
                metrics.get("teacher/sampling_positions", 0) + trd_metrics["trd/scored"]
            )
        return made, metrics

    def _blend(
        self, rows: list[tuple[Prompt, list[int]]], row_seeds: list[int], epsilon: float
    ) -> BlendedGumbel:
        """TRB's sampler: for live rows, the teacher's top-k at prompt + generated tokens, per decoding step."""
        cfg = self.cfg
        views = [self.factory.group(p, ids, [[]])[0] for p, ids in rows]  # the teacher's prompt and name
        eos = self.student.eos_token_id

        def probe(view: Rollout, ids: list[int]) -> Rollout:
            privileged = view.teacher_prefix_ids
            return dataclasses.replace(
                view,
                prompt_ids=view.prompt_ids + ids,
                completion_ids=[eos],  # a placeholder: its scored distribution is p(· | prefix)
                teacher_prefix_ids=privileged + ids if privileged is not None else None,
            )

        def teacher_next(
            generated_L: list[list[int]], rows_L: list[int]
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            probes = [probe(views[b], ids) for ids, b in zip(generated_L, rows_L, strict=True)]
            answers = self.link.collect(self.link.submit(probes, cfg.top_k))
            top_ids = torch.tensor(np.stack([a.top_ids_T_K[0] for a in answers]).astype("int64"))
            top_lp = torch.tensor(np.stack([a.top_logprobs_T_K[0] for a in answers]))
            tail = torch.tensor(np.array([a.tail_logprob_T[0] for a in answers]))
            return top_ids, top_lp, tail

        return BlendedGumbel(
            row_seeds,
            cfg.temperature,
            self.student.device,
            epsilon,
            teacher_next,
            [ids for _, ids in rows],
            eos,
        )

    def _refine(
        self, made: list[Rollout], row_seeds: list[int], index: int, horizon: int
    ) -> tuple[list[Rollout], dict[str, Any]]:
        """TRD: score the rollouts, cut each at its first failing token, let the teacher continue."""
        cfg = self.cfg
        scores = self.link.collect(self.link.submit(made, 1))
        cut_N = refine.cuts(scores, cfg.trd_min_logprob)
        out, generated = [], 0
        for i, (r, cut) in enumerate(zip(made, cut_N, strict=True)):
            if cut is None:
                out.append(r)
                continue
            continuation = self.link.client.generate_tokens(
                refine.teacher_view(r, cut),
                max_tokens=horizon - cut,
                temperature=1.0,
                seed=row_seed(cfg.seed, _TRD_STREAM, index, i),
                model=r.teacher,
            )[: horizon - cut]
            generated += len(continuation)
            out.append(refine.refined(r, cut, continuation))
        refined_n = sum(c is not None for c in cut_N)
        metrics = {
            "trd/refined_fraction": refined_n / max(1, len(made)),
            "trd/generated_tokens": generated,
            "trd/scored": sum(len(r.completion_ids) for r in made) + generated,
        }
        return out, metrics


def make_sampler(
    cfg: TrainConfig, student: Student, factory: RolloutFactory, link: TeacherLink
) -> MethodSampler | None:
    """The sampler a run's methods need (None: the student's plain samples, as without them)."""
    if cfg.off_policy_correction == "off" and cfg.trb_epsilon == 0 and not cfg.trd and not cfg.draft_opd:
        return None
    return MethodSampler(cfg, student, factory, link)
