"""TrainConfig: the one place every training setting lives, with its default and its meaning.

Values come from (lowest to highest precedence) the defaults below, a TOML/YAML file (`--config`), and
command-line flags, which are generated from these fields (`--max-new-tokens 64`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

LOSSES = ("reverse_kl", "topk_forward_kl", "student_topk_reverse_kl", "jsd")


@dataclass(frozen=True)
class TrainConfig:
    # --- teacher service
    # None: start a local `opd serve-teacher` with the embedded teacher. Several replicas: comma-separated
    # URLs, or one name resolving to several addresses (round-robin with failover).
    teacher_url: str | None = None
    teacher_api_key_env: str = "OPD_TEACHER_API_KEY"  # env var holding the key, if the service needs one
    teacher_model: str | None = None  # teacher name on the service (default: its first)
    teacher_timeout_s: float = 120.0  # per request
    teacher_wait_s: float = 1800.0  # how long to keep retrying an unreachable teacher before giving up
    max_inflight_requests: int = 4  # scoring requests in flight at once
    max_staleness: int = 1  # rollouts may come from a policy this many steps old (0: no overlap)
    # --- student and data
    student: str = "default"  # HF directory, or "default": the layer-pruned embedded teacher
    prompts: str = "default-train"  # JSONL file, or the shipped set
    eval_prompts: str = "default-heldout"
    dataset: str | None = None  # JSONL of fixed {"prompt"/"messages", "completion"} for GKD mixing
    # --- rollouts
    steps: int = 20
    prompts_per_step: int = 4
    samples_per_prompt: int = 2  # G
    max_new_tokens: int = 48
    temperature: float = 1.0
    # --- loss
    loss: str = "reverse_kl"  # one of LOSSES
    top_k: int = 20  # teacher top-k (forward KL, JSD) or student top-k (student_topk_reverse_kl)
    jsd_beta: float = 0.5
    discount: float = 0.0  # reverse_kl: γ of the return-to-go advantage (0: per-token reward)
    gkd_lambda: float = 1.0  # probability a step uses on-policy rollouts; else `dataset` sequences
    # --- optimisation
    lr: float = 5e-5
    lr_schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 4  # sequences per forward/backward (gradient accumulation over the step)
    bf16: str = "auto"  # auto: bf16 autocast where faster (CPU, CUDA); "true" / "false" to force
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    device: str = "auto"
    # --- bookkeeping
    out: str = "runs/opd"
    seed: int = 0
    save_every: int = 10
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: evaluate only before the first and after the last step
    eval_num_prompts: int = 32
    eval_max_new_tokens: int = 48

    def __post_init__(self) -> None:
        checks = [
            (self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}; got {self.loss!r}"),
            (self.steps >= 1, f"steps must be >= 1; got {self.steps}"),
            (self.prompts_per_step >= 1, f"prompts_per_step must be >= 1; got {self.prompts_per_step}"),
            (self.samples_per_prompt >= 1, f"samples_per_prompt must be >= 1; got {self.samples_per_prompt}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1; got {self.max_new_tokens}"),
            (self.temperature > 0, f"temperature must be > 0; got {self.temperature}"),
            (self.top_k >= 1, f"top_k must be >= 1; got {self.top_k}"),
            (0 <= self.jsd_beta <= 1, f"jsd_beta must be in [0, 1]; got {self.jsd_beta}"),
            (0 <= self.discount <= 1, f"discount must be in [0, 1]; got {self.discount}"),
            (0 <= self.gkd_lambda <= 1, f"gkd_lambda must be in [0, 1]; got {self.gkd_lambda}"),
            (self.gkd_lambda == 1 or self.dataset, "gkd_lambda < 1 needs a dataset of fixed sequences"),
            (self.max_staleness >= 0, f"max_staleness must be >= 0; got {self.max_staleness}"),
            (self.max_inflight_requests >= 1, "max_inflight_requests must be >= 1"),
            (self.micro_batch_size >= 1, f"micro_batch_size must be >= 1; got {self.micro_batch_size}"),
            (self.lr_schedule in ("constant", "cosine"), "lr_schedule must be constant or cosine"),
            (self.bf16 in ("auto", "true", "false"), f"bf16 must be auto, true or false; got {self.bf16!r}"),
            (self.save_every >= 0 and self.eval_every >= 0, "save_every and eval_every must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"config: {message}")

    @property
    def rollouts_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def read_config_file(path: Path) -> dict[str, Any]:
    """Settings from a TOML or YAML file; keys are TrainConfig fields (dashes allowed)."""
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            import tomli as tomllib
        data = tomllib.loads(text)
    data = {k.replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return data


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field (default None, so only flags the user gave override the file)."""
    parser.add_argument("--config", type=Path, help="TOML or YAML file with TrainConfig settings")
    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            base = next((t for t in (int, float) if kind is t), str)
            parser.add_argument(
                flag, type=base, default=None, metavar=f.name.upper(), help=f"(default: {f.default})"
            )


def config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(read_config_file(args.config))
    for f in fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)
