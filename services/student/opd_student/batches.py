"""Where each step's rollouts come from: the student's samples of the step's prompts (on-policy), or, with
GKD mixing (gkd_lambda < 1), fixed sequences of a dataset; both cut to the step's horizon (TOPD / POPD).

The source's whole position (prompt stream, GKD's draw, dataset row) is captured before every batch, so a
checkpoint taken while batches are in flight resumes by drawing them again exactly.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opd_student import losses
from opd_student.config import TrainConfig
from opd_student.methods.options import MethodOptions
from opd_student.prompts import Prompt, PromptStream, parse_prompts
from opd_student.rollout_factory import RolloutFactory
from opd_student.rollouts import Rollout, row_seed
from opd_student.student_model import Student


@dataclass
class StepRollouts:
    rollouts: list[Rollout]  # this rank's share of the step's rollouts
    state: dict[str, Any]  # the source's position before this batch was drawn (resume restarts here)
    horizon: int  # the most completion tokens a rollout may have
    metrics: dict[str, Any] = field(default_factory=dict)  # what a method's sampler spent (TRB, TRD)


class BatchSource:
    def __init__(
        self,
        cfg: TrainConfig,
        student: Student,
        factory: RolloutFactory,
        methods: MethodOptions,
        prompts: list[Prompt],
        dataset: list[Rollout] | None = None,
    ) -> None:
        self.cfg, self.student, self.factory, self.methods = cfg, student, factory, methods
        self.stream = PromptStream(prompts, seed=cfg.seed)
        self.mix_rng = random.Random(cfg.seed)
        self.dataset = dataset or []
        self.dataset_pos = 0
        # makes the rollouts instead of plain sampling when a method needs it (methods/sampling.py)
        self.sampler: Any = None

    def next(self, index: int) -> StepRollouts:
        """The rollouts of the step with 0-based index `index`."""
        cfg, world = self.cfg, self.student.world
        state = self.state_dict()
        horizon = self.methods.horizon(index)  # generation stops there (TOPD / POPD)
        on_policy = losses.gkd_mix(self.mix_rng, cfg.gkd_lambda)  # one draw per step whatever λ
        if not on_policy:
            rows = self._dataset_rows(cfg.rollouts_per_step)
            mine = [rows[i] for i in world.share(len(rows))]
            return StepRollouts(self.methods.cut(mine, horizon), state, horizon)
        # Every rank draws the whole step (so all hold the same data position) and samples its share.
        step_prompts = [next(self.stream) for _ in range(cfg.prompts_per_step)]
        mine_P = list(world.share(len(step_prompts)))
        prompts = [step_prompts[p] for p in mine_P]
        prompt_ids = [self.factory.prompt_ids(p) for p in prompts]
        G = cfg.samples_per_prompt
        if self.sampler is not None:  # behaviour logprobs recorded, TRB's blend, TRD's refinement
            seeds = [row_seed(cfg.seed, 0, index, p * G + g) for p in mine_P for g in range(G)]
            made, made_metrics = self.sampler.rollouts(prompts, prompt_ids, seeds, index, horizon)
            return StepRollouts(made, state, horizon, made_metrics)
        completions_P_G = self.student.sample(
            prompt_ids,
            G,
            horizon,
            cfg.temperature,
            row_seeds=[row_seed(cfg.seed, 0, index, p * G + g) for p in mine_P for g in range(G)],
        )
        return StepRollouts(self.factory.rollouts(prompts, prompt_ids, completions_P_G), state, horizon)

    def _dataset_rows(self, n: int) -> list[Rollout]:
        """The next n fixed sequences (GKD's off-policy share), cycling through the dataset."""
        out = []
        for _ in range(n):
            out.append(self.dataset[self.dataset_pos % len(self.dataset)])
            self.dataset_pos += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "stream": self.stream.state_dict(),
            "mix_rng": self.mix_rng.getstate(),
            "dataset_pos": self.dataset_pos,
        }

    def load_state_dict(self, state: dict[str, Any], legacy_mix_rng: Any = None) -> None:
        """A state_dict() from a checkpoint; checkpoints written before the source had its own state hold
        the prompt stream's state alone (and GKD's draw next to it)."""
        if "stream" not in state:
            state = {"stream": state, "mix_rng": legacy_mix_rng, "dataset_pos": 0}
        self.stream.load_state_dict(state["stream"])
        if state["mix_rng"] is not None:
            self.mix_rng.setstate(state["mix_rng"])
        self.dataset_pos = int(state["dataset_pos"])


def load_dataset(path: Path, factory: RolloutFactory) -> list[Rollout]:
    """Fixed sequences for GKD mixing: prompt-file lines with an extra "completion" string. They are routed
    and given the teacher's context like sampled rollouts (the same factory)."""
    prompt_lines, completions = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            prompt_lines.append(line)
            continue
        try:
            row = json.loads(line)
            completion = row.pop("completion")
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
            raise SystemExit(
                f"error: {path}:{lineno}: a dataset line is a JSON object with a 'completion'"
            ) from None
        if not isinstance(completion, str):
            raise SystemExit(f"error: {path}:{lineno}: completion must be a string")
        prompt_lines.append(json.dumps(row))
        completions.append(completion)
    prompts = parse_prompts("\n".join(prompt_lines), source=str(path))
    tokenizer = factory.tokenizer
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out += factory.group(prompt, factory.prompt_ids(prompt), [ids], on_policy=False)
    if not out:
        raise SystemExit(f"error: dataset {path} is empty")
    return out
