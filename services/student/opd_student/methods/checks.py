"""Validation of the methods' settings, for TrainConfig (kept free of torch: the config loads fast)."""

from __future__ import annotations

from opd_student.methods.routing import parse_teacher_rules
from opd_student.methods.token_mask import TokenMaskRule

# Options that reweight the token loss: they need a logprob loss, not the black-box chunk reward.
WEIGHTING = ("ta_opd", "fire_opd", "loss_token_ids", "loss_regex", "evidence_mask")


def config_problems(cfg) -> list[str]:
    """Messages for method settings that cannot work (TrainConfig.__post_init__ raises on the first)."""
    checks = [
        (0 < cfg.horizon_ratio <= 1, f"horizon_ratio must be in (0, 1]; got {cfg.horizon_ratio}"),
        (
            cfg.horizon_start >= 0,
            f"horizon_start must be >= 0 (0: no POPD schedule); got {cfg.horizon_start}",
        ),
        (cfg.horizon_growth >= 0, f"horizon_growth must be >= 0; got {cfg.horizon_growth}"),
        (cfg.horizon_every >= 1, f"horizon_every must be >= 1; got {cfg.horizon_every}"),
        (0 < cfg.ta_fraction <= 1, f"ta_fraction must be in (0, 1]; got {cfg.ta_fraction}"),
        (cfg.ta_student_top_k >= 1, f"ta_student_top_k must be >= 1; got {cfg.ta_student_top_k}"),
        (
            0 <= cfg.fire_drop_fraction < 1,
            f"fire_drop_fraction must be in [0, 1); got {cfg.fire_drop_fraction}",
        ),
    ]
    problems = [message for ok, message in checks if not ok]
    for build in (
        lambda: parse_teacher_rules(cfg.teacher_rules),
        lambda: TokenMaskRule.from_config(cfg.loss_token_ids, cfg.loss_regex),
    ):
        try:
            build()
        except (ValueError, OSError) as e:
            problems.append(str(e))
    if cfg.loss == "chunk":
        problems += [
            f"{name} needs a logprob loss, not loss chunk" for name in WEIGHTING if getattr(cfg, name)
        ]
    return problems
