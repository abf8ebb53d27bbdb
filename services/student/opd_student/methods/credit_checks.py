"""Validation of the credit, routing and off-policy methods' settings (docs/methods.md, "Methods II"), for
TrainConfig; free of torch, like checks.py, so the config loads fast."""

from __future__ import annotations

# Methods that change the sampled-token policy gradient: signals/policy_gradient.py, loss reverse_kl only.
SAMPLED_TOKEN_METHODS = ("gae_opd", "lookahead_group", "cr_opd", "trd")


def sampled_token_methods(cfg) -> list[str]:
    """The sampled-token methods a run has on (each needs loss reverse_kl)."""
    names = [name for name in SAMPLED_TOKEN_METHODS if getattr(cfg, name)]
    if cfg.off_policy_correction != "off":
        names.append(f"off_policy_correction {cfg.off_policy_correction}")
    if cfg.near_future_window > 0:
        names.append("near_future_window")
    return names


def credit_problems(cfg) -> list[str]:
    """Messages for settings that cannot work (TrainConfig raises on the first)."""
    on = sampled_token_methods(cfg)
    checks = [
        (
            cfg.is_cap >= 1,
            f"is_cap must be >= 1 (a ratio cap below 1 shrinks on-policy tokens); got {cfg.is_cap}",
        ),
        (0 < cfg.ppo_clip < 1, f"ppo_clip must be in (0, 1); got {cfg.ppo_clip}"),
        (0 < cfg.drpo_delta <= 1, f"drpo_delta must be in (0, 1]; got {cfg.drpo_delta}"),
        (0 <= cfg.gae_gamma <= 1, f"gae_gamma must be in [0, 1]; got {cfg.gae_gamma}"),
        (0 <= cfg.gae_lambda <= 1, f"gae_lambda must be in [0, 1]; got {cfg.gae_lambda}"),
        (cfg.near_future_window >= 0, f"near_future_window must be >= 0; got {cfg.near_future_window}"),
        (cfg.lookahead_candidates >= 2, f"lookahead_candidates must be >= 2; got {cfg.lookahead_candidates}"),
        (cfg.lookahead_positions >= 1, f"lookahead_positions must be >= 1; got {cfg.lookahead_positions}"),
        (cfg.lookahead_coef >= 0 and cfg.cr_coef >= 0, "lookahead_coef and cr_coef must be >= 0"),
        (cfg.cr_top_k >= 1, f"cr_top_k must be >= 1; got {cfg.cr_top_k}"),
        (cfg.trb_epsilon >= 0, f"trb_epsilon must be >= 0 (0: off); got {cfg.trb_epsilon}"),
        (cfg.trb_steps >= 1, f"trb_steps must be >= 1; got {cfg.trb_steps}"),
        (cfg.cold_start_steps >= 0, f"cold_start_steps must be >= 0; got {cfg.cold_start_steps}"),
        (
            0 < cfg.prompt_selection_fraction <= 1,
            f"prompt_selection_fraction must be in (0, 1]; got {cfg.prompt_selection_fraction}",
        ),
        (cfg.prompt_selection_tokens >= 1, "prompt_selection_tokens must be >= 1"),
        (
            not on or cfg.loss == "reverse_kl",
            f"{', '.join(on)} change the sampled-token policy gradient: they need loss reverse_kl; got {cfg.loss}",
        ),
        (
            not on or not cfg.cross_tokenizer,
            f"{', '.join(on)} work on token-level scores: not with cross_tokenizer",
        ),
        (
            not (cfg.gae_opd and cfg.near_future_window),
            "gae_opd and near_future_window are two advantage estimators: choose one",
        ),
        (
            not ((cfg.gae_opd or cfg.near_future_window) and cfg.discount > 0),
            "discount is the return-to-go advantage; gae_opd (gae_gamma) and near_future_window replace it",
        ),
        (
            cfg.off_policy_correction == "off" or cfg.gkd_lambda == 1,
            "off_policy_correction needs the sampling policy's logprobs, which GKD's dataset sequences lack",
        ),
        (
            cfg.student_topk_form == "tail" or cfg.loss == "student_topk_reverse_kl",
            f"student_topk_form is a form of loss student_topk_reverse_kl; got loss {cfg.loss}",
        ),
        (
            not (cfg.trb_epsilon > 0 and (cfg.loss == "chunk" or cfg.cross_tokenizer)),
            "trb_epsilon blends the teacher's token distribution into sampling: it needs a same-tokenizer "
            "white-box teacher",
        ),
        (
            not (cfg.cold_start_steps and (cfg.loss == "chunk" or cfg.cross_tokenizer)),
            "cold_start_steps trains on the teacher's own token ids: it needs a same-tokenizer white-box teacher",
        ),
    ]
    return [message for ok, message in checks if not ok]
