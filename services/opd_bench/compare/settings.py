"""What every arm of the comparison shares, and what each arm is.

The defaults finish all five arms and their evaluations in about 20-25 minutes on 2 idle CPU cores
(docs/compare.md); a GPU setting is given there too.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# GKD's JSD(β) for the JSD arms (opd's default jsd_beta; β = 0.5 is the symmetric JSD in both tools).
JSD_BETA = 0.5
# opd's default teacher top-k for the JSD arm (the service returns top-20 + the tail bucket).
OPD_TOP_K = 20
# ServerDistillationTrainer allows only top-1 support for beta > 0; beta = 1 is its reverse KL on the
# sampled token (+ tail bucket): the same teacher signal opd's sampled-token reverse KL uses.
TRL_SERVER_BETA = 1.0
TRL_SERVER_TOP_K = 1


@dataclass(frozen=True)
class CompareSettings:
    steps: int = 15
    prompts_per_step: int = 4
    samples_per_prompt: int = (
        2  # G: each prompt is sampled G times per step (TRL: the prompt repeated G times)
    )
    max_new_tokens: int = 48
    micro_batch_size: int = 4  # sequences per forward/backward; the step's batch is accumulated
    lr: float = 5e-5  # AdamW, constant schedule, no warmup, no weight decay, grad clip 1.0, in every arm
    seed: int = 0
    eval_every: int = 5  # held-out KL at step 0, every eval_every steps, and at the end
    eval_num_prompts: int = 32
    eval_max_new_tokens: int = 48
    train_prompts: str = "default-train"
    eval_prompts: str = "default-heldout"
    student: str = "default"  # opd_student.tools.make_student.resolve_student
    teacher: str = "smollm2-135m-instruct"  # the service's --model; the TRL in-process teacher loads the same
    device: str = "auto"

    def __post_init__(self) -> None:
        positive = ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "micro_batch_size")
        for name in positive + ("eval_num_prompts", "eval_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0; got {self.eval_every}")

    @property
    def rollouts_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    @property
    def micro_batch(self) -> int:
        """The micro-batch every arm uses: micro_batch_size if it divides the step's batch, else the batch
        (TRL needs per-device batch × accumulation steps = the step's batch)."""
        r = self.rollouts_per_step
        return self.micro_batch_size if r % self.micro_batch_size == 0 else r

    @property
    def accumulation_steps(self) -> int:
        return self.rollouts_per_step // self.micro_batch

    @property
    def eval_seed(self) -> int:
        return self.seed + 1234  # what `opd train` passes to evaluate(), so all arms see the same stream

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> CompareSettings:
        return cls(**json.loads(path.read_text()))


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # opd | trl-distill | trl-server | sft
    tool: str
    loss: str


ARMS = (
    Arm("opd-rkl", "opd", "opd train", "sampled-token reverse KL (policy gradient, per-token reward)"),
    Arm("opd-jsd", "opd", "opd train", f"JSD(β={JSD_BETA}) on the teacher's top-{OPD_TOP_K} + tail"),
    Arm(
        "opd-exact-rkl",
        "opd",
        "opd train",
        "exact reverse KL, full vocabulary (the teacher's hidden states + its head)",
    ),
    Arm(
        "opd-exact-jsd",
        "opd",
        "opd train",
        f"exact JSD(β={JSD_BETA}), full vocabulary (the teacher's hidden states + its head)",
    ),
    Arm("trl-distill", "trl-distill", "TRL DistillationTrainer", f"JSD(β={JSD_BETA}), full vocabulary"),
    Arm(
        "trl-server",
        "trl-server",
        "TRL ServerDistillationTrainer",
        "reverse KL on the sampled token + tail (beta=1, loss_top_k=1)",
    ),
    Arm("sft", "sft", "TRL SFTTrainer", "cross-entropy on teacher samples (same teacher-token budget)"),
)
ARM_NAMES = tuple(a.name for a in ARMS)
BY_NAME = {a.name: a for a in ARMS}


def select_arms(only: str | None) -> list[Arm]:
    """The arms named in a comma-separated list (all when empty), in the fixed order: the SFT budget
    comes from opd-rkl, so opd-rkl runs first."""
    if not only:
        return list(ARMS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(unknown)}; arms: {', '.join(ARM_NAMES)}")
    return [a for a in ARMS if a.name in names]
