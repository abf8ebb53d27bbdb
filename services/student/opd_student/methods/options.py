"""The methods' settings of a run, parsed once, and the calls the trainer makes into them.

Asked by the batch source: the horizon of step k (generation's max_new_tokens) and the cut of fixed
sequences to it; by the token-score signals: the token weights of a step; by the loop: the generation
metrics. Teacher routing and privileged context are the rollout factory's (rollout_factory.py). With every
method off these reproduce plain OPD exactly.
"""

from __future__ import annotations

import dataclasses

from opd_client.scores import SequenceScores
from opd_student.distributed import SINGLE, World
from opd_student.methods.horizon import rollout_horizon
from opd_student.methods.routing import parse_teacher_rules
from opd_student.methods.step_weights import StepWeights, teachability_pass
from opd_student.methods.token_mask import TokenMaskRule
from opd_student.rollouts import Rollout
from opd_student.student_model import Student


class MethodOptions:
    def __init__(self, cfg, several_teachers: bool = False) -> None:
        self.cfg = cfg
        self.rules = parse_teacher_rules(cfg.teacher_rules)
        self.mask_rule = TokenMaskRule.from_config(cfg.loss_token_ids, cfg.loss_regex)
        self.several_teachers = several_teachers  # log per-teacher metrics

    # --- sampling

    def horizon(self, step_index: int) -> int:
        """max_new_tokens for the rollouts of the step with 0-based index k (TOPD / POPD)."""
        cfg = self.cfg
        return rollout_horizon(
            step_index,
            cfg.max_new_tokens,
            cfg.horizon_ratio,
            cfg.horizon_start,
            cfg.horizon_growth,
            cfg.horizon_every,
        )

    @staticmethod
    def cut(rollouts: list[Rollout], horizon: int) -> list[Rollout]:
        """Fixed dataset sequences (GKD mixing) cut to the horizon, like the rollouts generation made."""
        return [
            r
            if len(r.completion_ids) <= horizon
            else dataclasses.replace(r, completion_ids=r.completion_ids[:horizon])
            for r in rollouts
        ]

    @staticmethod
    def generation_metrics(rollouts: list[Rollout], horizon: int, world: World = SINGLE) -> dict[str, float]:
        """What the step generated, over all ranks' rollouts."""
        lengths = [len(r.completion_ids) for r in rollouts]
        on_policy = rollouts[0].on_policy if rollouts else True
        n_privileged = sum(r.teacher_prefix_ids is not None for r in rollouts)
        tokens, privileged, n_rollouts = world.sum(
            [sum(lengths) if on_policy else 0, n_privileged, len(rollouts)]
        )
        return {
            "gen/horizon": horizon,
            "gen/tokens": int(tokens),  # tokens the student generated for this step
            "gen/max_len": int(world.max(max(lengths, default=0))),
            "gen/privileged": privileged / max(1, n_rollouts),
        }

    # --- the optimizer step

    def step_weights(
        self,
        student: Student,
        rollouts: list[Rollout],
        scores: list[SequenceScores],
        evidence_N_T: list | None = None,
    ) -> StepWeights:
        """The step's token weights; evidence_N_T: EDGE-OPD's evidence per rollout (methods/evidence.py)."""
        weights = StepWeights(
            self.cfg, rollouts, scores, student.tokenizer, self.mask_rule, student.world, evidence_N_T
        )
        if self.cfg.ta_opd:
            weights.select_teachable(teachability_pass(self.cfg, student, rollouts, scores))
        return weights
