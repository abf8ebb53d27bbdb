"""The methods' settings of a run, parsed once, and the few calls the training loop makes into them.

train.py asks: the horizon of step k (generation's max_new_tokens), the rollouts of sampled completions
(teacher routing, privileged context, loss spans), the token weights of a step, the per-teacher and
generation metrics. With every method off these reproduce plain OPD exactly.
"""

from __future__ import annotations

import dataclasses

from opd_client.scores import SequenceScores
from opd_student.distributed import SINGLE, World
from opd_student.methods.horizon import rollout_horizon
from opd_student.methods.routing import parse_teacher_rules, route, teachers_used
from opd_student.methods.step_weights import StepWeights, teachability_pass
from opd_student.methods.token_mask import TokenMaskRule
from opd_student.prompts import Prompt, render
from opd_student.rollouts import Rollout


class MethodOptions:
    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.rules = parse_teacher_rules(cfg.teacher_rules)
        self.mask_rule = TokenMaskRule.from_config(cfg.loss_token_ids, cfg.loss_regex)
        self.several_teachers = False  # set by check_teachers: log per-teacher metrics

    # --- start-up

    def check_teachers(self, link, tokenizer, prompts: list[Prompt]) -> list[str | None]:
        """Every teacher the prompts route to exists on the service and shares the student's tokenizer
        (a clear error at start instead of a failed request at the first step)."""
        names = teachers_used(prompts, self.rules, self.cfg.teacher_model)
        for name in names:
            if name == self.cfg.teacher_model:
                continue  # the default teacher is checked by setup_run already
            if link.check(tokenizer, name).black_box != (self.cfg.loss == "chunk"):
                raise SystemExit(
                    f"error: prompts are routed to teacher {name!r}, which is "
                    f"{'black-box' if self.cfg.loss != 'chunk' else 'white-box'}: it cannot serve loss {self.cfg.loss}"
                )
        self.several_teachers = len(names) > 1
        return names

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

    def rollouts(
        self,
        prompts: list[Prompt],
        prompt_ids: list[list[int]],
        completions_P_G: list[list[list[int]]],
        tokenizer,
    ) -> list[Rollout]:
        """One Rollout per sampled completion, with its teacher, privileged prefix and loss spans."""
        out = []
        for prompt, ids, group in zip(prompts, prompt_ids, completions_P_G, strict=True):
            prefix = self.teacher_prefix(prompt, tokenizer)
            teacher = route(prompt, self.rules, self.cfg.teacher_model)
            out += [Rollout(ids, c, prefix, teacher, prompt.id, loss_spans=prompt.loss_spans) for c in group]
        return out

    def teacher_prefix(self, prompt: Prompt, tokenizer) -> list[int] | None:
        """The privileged context (`teacher_messages`), unless privileged_context is off."""
        if prompt.teacher_messages is None or not self.cfg.privileged_context:
            return None
        return render(prompt, tokenizer, for_teacher=True)

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
        privileged = sum(r.teacher_prefix_ids is not None for r in rollouts)
        tokens, privileged, n_rollouts = world.sum(
            [sum(lengths) if on_policy else 0, privileged, len(rollouts)]
        )
        return {
            "gen/horizon": horizon,
            "gen/tokens": int(tokens),  # tokens the student generated for this step
            "gen/max_len": int(world.max(max(lengths, default=0))),
            "gen/privileged": privileged / max(1, n_rollouts),
        }

    # --- the optimizer step

    def step_weights(self, ctx, rollouts: list[Rollout], scores: list[SequenceScores]) -> StepWeights:
        weights = StepWeights(self.cfg, rollouts, scores, ctx.tokenizer, self.mask_rule, ctx.world)
        if self.cfg.ta_opd:
            taus = teachability_pass(
                self.cfg, ctx.student, ctx.tokenizer.pad_token_id, rollouts, scores, ctx.bf16
            )
            weights.select_teachable(taus)
        return weights
