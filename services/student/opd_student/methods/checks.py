"""Validation of the methods' settings, for TrainConfig (kept free of torch: the config loads fast)."""

from __future__ import annotations

from opd_student.methods.credit_checks import credit_problems
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
    problems += credit_problems(cfg)
    if cfg.loss == "chunk":
        problems += [
            f"{name} needs a logprob loss, not loss chunk" for name in WEIGHTING if getattr(cfg, name)
        ]
    problems += update_problems(cfg)
    return problems


def update_problems(cfg) -> list[str]:
    """Settings of update_mask, effopd, and lm_coef that cannot work."""
    checks = [
        (
            not (cfg.update_mask and cfg.weight_decay > 0),
            "update_mask keeps the masked coordinates at their starting values, which AdamW's weight decay "
            f"would still shrink: set weight_decay = 0 (got {cfg.weight_decay})",
        ),
        (
            not ((cfg.update_mask or cfg.effopd) and cfg.lora),
            "update_mask and effopd choose coordinates of the full weights; they do not apply to LoRA adapters",
        ),
        (cfg.effopd_probe_steps >= 1, f"effopd_probe_steps must be >= 1; got {cfg.effopd_probe_steps}"),
        (
            0 < cfg.effopd_keep_fraction <= 1,
            f"effopd_keep_fraction must be in (0, 1]; got {cfg.effopd_keep_fraction}",
        ),
        (0 <= cfg.lm_coef <= 1, f"lm_coef must be in [0, 1]; got {cfg.lm_coef}"),
        (cfg.lm_batch_size >= 1, f"lm_batch_size must be >= 1; got {cfg.lm_batch_size}"),
        (cfg.lm_max_tokens >= 1, f"lm_max_tokens must be >= 1; got {cfg.lm_max_tokens}"),
    ]
    if cfg.draft_opd:
        checks += draft_checks(cfg)
    return [message for ok, message in checks if not ok]


def draft_checks(cfg) -> list[tuple[bool, str]]:
    """Draft-OPD's settings: its rollouts mix the teacher's corrections into the student's blocks, so it
    needs a loss that depends on the context alone, and the teacher's token ids (same tokenizer)."""
    sampling = [name for name, on in (("trb_epsilon", cfg.trb_epsilon > 0), ("trd", cfg.trd)) if on] + (
        ["off_policy_correction"] if cfg.off_policy_correction != "off" else []
    )
    return [
        (cfg.draft_block >= 1, f"draft_block must be >= 1; got {cfg.draft_block}"),
        (cfg.draft_replays >= 0, f"draft_replays must be >= 0; got {cfg.draft_replays}"),
        (
            cfg.loss not in ("reverse_kl", "chunk"),
            "draft_opd trains on sequences the teacher corrected: it needs a loss over the distribution "
            f"(exact_reverse_kl, topk_forward_kl, jsd...), not {cfg.loss}",
        ),
        (
            not cfg.cross_tokenizer,
            "draft_opd verifies drafted token ids: the teacher must share the tokenizer",
        ),
        (not sampling, f"draft_opd makes its own rollouts: not with {', '.join(sampling)}"),
    ]
