"""`loss = "reverse_kl"` with the credit, routing and off-policy methods of docs/methods.md ("Methods II"):
the same white-box token scores as SampledToken, and a per-token loss built in three parts,

    ℓ_t = surrogate(A_t; ρ_t) · keep_t  +  η_cr · c_t (CR-OPD)  +  η_la · g_t (LGR)  +  NLL of TRD's teacher tokens

- A_t, the advantage of the sampled token: the reward r_t = log p(x_t) − log q(x_t) (or its return-to-go,
  `discount`), GAE-OPD's GAE over it, or TOPD's near-future mean (methods/credit.py);
- the surrogate: −A_t log q(x_t) on-policy, or reweighted by ρ_t = q_θ(x_t)/μ(x_t) for stale rollouts
  (methods/off_policy.py: truncated IS, PPO clipping, DRPO);
- keep_t: TOPD's suppression of non-divergent high-loss tokens;
- c_t: CR-OPD's routed term on the student's top-k scored by the teacher (methods/routed.py);
- g_t: LGR's lookahead group reward on the student's candidates at high-entropy positions
  (methods/lookahead.py), scored by the teacher in extra sequences of the step's request;
- TRD's rollouts carry teacher-written tokens from `teacher_from` on: those get −log q(x_t) (the forward KL
  on teacher samples, as TRD's code trains them) instead of the policy gradient.

With every one of these off, `make_signal` keeps SampledToken, so plain runs are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from opd_student import losses
from opd_student.methods import credit, lookahead, off_policy, routed, topk_forms
from opd_student.methods.credit_checks import sampled_token_methods
from opd_student.microbatch import MicroBatch, no_grad_pass
from opd_student.rollouts import Rollout, TeacherTensors
from opd_student.signals.token_scores import (
    StudentTopK,
    TokenFeedback,
    TokenRequest,
    TokenScoreSignal,
    TokenStepLoss,
)
from opd_student.teacher_link import Pending


@dataclass
class StudentView:
    """What a no-grad student pass at request time gives one rollout."""

    top_ids: list | None = None  # CR-OPD: [T][k] the student's top-k ids
    points: lookahead.LookaheadPoints | None = None  # LGR: positions and candidates


@dataclass
class PGRequest(TokenRequest):
    views: list[StudentView] = field(default_factory=list)
    lookahead: Pending | None = None


@dataclass
class PGFeedback(TokenFeedback):
    views: list[StudentView] = field(default_factory=list)
    lookahead_rewards: list[torch.Tensor] | None = None  # per rollout [M, K]
    lookahead_positions: int = 0  # extra positions the teacher scored for LGR


class PolicyGradient(TokenScoreSignal):
    def request(self, rollouts: list[Rollout]) -> PGRequest:
        views = self._student_views(rollouts)
        score_ids = [v.top_ids for v in views] if self.cfg.cr_opd else None
        pending = self.link.submit(rollouts, self.cfg.top_k, score_ids)
        extra = None
        if self.cfg.lookahead_group:
            points = [v.points for v in views if v.points is not None]  # every view has them with LGR on
            extra_rollouts = lookahead.lookahead_rollouts(rollouts, points, self.student.eos_token_id)
            extra = self.link.submit(extra_rollouts, top_k=1) if extra_rollouts else None
        return PGRequest(pending, score_ids, self.evidence_request(rollouts), views, extra)

    def _student_views(self, rollouts: list[Rollout]) -> list[StudentView]:
        """CR-OPD's top-k ids and LGR's triggered positions, from one no-grad student pass (none needed: [])."""
        cfg = self.cfg
        if not (cfg.cr_opd or cfg.lookahead_group):
            return [StudentView() for _ in rollouts]

        def view(mb: MicroBatch) -> list[StudentView]:
            logprobs_B_T_V = mb.logprobs_B_T_V.float()
            out = []
            for b, i in enumerate(mb.idx):
                T = len(rollouts[i].completion_ids)
                v = StudentView()
                if cfg.cr_opd:
                    v.top_ids = logprobs_B_T_V[b, :T].topk(cfg.cr_top_k, dim=-1).indices.tolist()
                if cfg.lookahead_group:
                    lp_T_V = logprobs_B_T_V[b, :T]
                    entropy_T = -(lp_T_V.exp() * lp_T_V).sum(-1)
                    positions = lookahead.top_entropy_positions(entropy_T, cfg.lookahead_positions)
                    top_M_K = lp_T_V[positions].topk(cfg.lookahead_candidates, dim=-1).indices.tolist()
                    v.points = lookahead.LookaheadPoints(positions, top_M_K)
                out.append(v)
            return out

        return no_grad_pass(self.student, rollouts, cfg.micro_batch_size, view)

    def collect(self, request: TokenRequest) -> PGFeedback:
        assert isinstance(request, PGRequest)
        answers = self.link.collect(request.lookahead) if request.lookahead is not None else None
        base = super().collect(request)
        rewards, extra_positions = None, 0
        if self.cfg.lookahead_group:
            rewards, extra_positions = _lookahead_rewards(request.views, answers or [])
        return PGFeedback(
            base.scores, base.score_ids, base.evidence_N_T, request.views, rewards, extra_positions
        )

    def step_loss(self, rollouts: list[Rollout], feedback: TokenFeedback) -> PGStepLoss:
        assert isinstance(feedback, PGFeedback)
        return PGStepLoss(self, rollouts, feedback)


def _lookahead_rewards(views: list[StudentView], answers: list) -> tuple[list[torch.Tensor], int]:
    """Each rollout's group-normalised rewards [M, K], in the order lookahead_rollouts sent them."""
    confidence = lookahead.confidences(answers) if answers else torch.zeros(0)
    out, at = [], 0
    for v in views:
        assert v.points is not None
        M, K = len(v.points.positions), len(v.points.candidates[0]) if v.points.candidates else 0
        conf_M_K = confidence[at : at + M * K].reshape(M, K) if M else torch.zeros((0, K))
        out.append(torch.stack([lookahead.group_rewards(c_K) for c_K in conf_M_K]) if M else conf_M_K)
        at += M * K
    return out, at


class PGStepLoss(TokenStepLoss):
    """TokenStepLoss with the sampled-token methods' per-token loss and their numbers."""

    def __init__(self, signal: PolicyGradient, rollouts: list[Rollout], feedback: PGFeedback) -> None:
        super().__init__(signal, rollouts, feedback)
        self.pg_feedback = feedback
        # summed over the step's micro-batches, then over ranks: ratio Σ, |log ratio| Σ, tokens corrected,
        # tokens with a ratio, tokens kept by TOPD, routed tokens, TRD teacher tokens, lookahead positions,
        # advantage Σ, advantage tokens
        self.sums = [0.0] * 10
        self.ratio_max = 0.0
        self.sums[7] = float(feedback.lookahead_positions)

    def token_loss(
        self,
        mb: MicroBatch,
        q_tok_B_T: torch.Tensor,
        teacher: TeacherTensors,
        score_ids_B_T_K: torch.Tensor | None,
        names_B: list[str | None],
    ) -> torch.Tensor:
        cfg = self.signal.cfg
        rows = [self.rollouts[i] for i in mb.idx]
        mask_B_T = mb.mask_B_T
        horizon = mask_B_T.shape[1]
        teacher_B_T = _teacher_written(rows, horizon)  # TRD: these tokens are the teacher's
        student_mask_B_T = mask_B_T * (1 - teacher_B_T)
        p_B_T = teacher.token_logprobs_B_T
        rewards_B_T = -losses.sampled_reverse_kl(q_tok_B_T.detach(), p_B_T, student_mask_B_T)
        topk = (
            mb.logprobs_B_T_V,
            teacher.top_ids_B_T_K,
            teacher.top_logprobs_B_T_K,
            teacher.tail_logprob_B_T,
        )
        keep_B_T = None
        if cfg.gae_opd:
            values_B_T = credit.topk_value(*topk, student_mask_B_T)
            adv_B_T = credit.gae_advantages(
                rewards_B_T, values_B_T, student_mask_B_T, cfg.gae_gamma, cfg.gae_lambda
            )
        elif cfg.near_future_window > 0:
            window, tau = cfg.near_future_window, cfg.near_future_threshold
            adv_B_T = credit.near_future_advantages(rewards_B_T, student_mask_B_T, window)
            divergence_B_T = credit.topk_reverse_kl(*topk, student_mask_B_T)
            keep_B_T = credit.near_future_keep(rewards_B_T, divergence_B_T, student_mask_B_T, window, tau)
            self.sums[4] += float(keep_B_T.sum())
        else:
            adv_B_T = losses.reverse_kl_advantages(q_tok_B_T.detach(), p_B_T, student_mask_B_T, cfg.discount)
        self.sums[8] += float(adv_B_T.sum())
        self.sums[9] += float(student_mask_B_T.sum())
        loss_B_T = self._surrogate(rows, q_tok_B_T, adv_B_T, student_mask_B_T)
        if keep_B_T is not None:
            loss_B_T = loss_B_T * keep_B_T
        if cfg.cr_opd:
            assert score_ids_B_T_K is not None and teacher.score_logprobs_B_T_M is not None
            routed_B_T = routed.routed_term(
                mb.logprobs_B_T_V, score_ids_B_T_K, teacher.score_logprobs_B_T_M, rewards_B_T,
                student_mask_B_T, cfg.cr_threshold,
            )  # fmt: skip
            self.sums[5] += float((routed_B_T != 0).sum())
            loss_B_T = loss_B_T + cfg.cr_coef * routed_B_T
        if cfg.lookahead_group:
            feedback = self.pg_feedback
            assert feedback.lookahead_rewards is not None
            points = [feedback.views[i].points for i in mb.idx]
            ids_B_T_K, rewards_B_T_K = lookahead.dense_targets(
                points,  # type: ignore[arg-type]
                [feedback.lookahead_rewards[i] for i in mb.idx],
                horizon,
                cfg.lookahead_candidates,
            )
            term_B_T = lookahead.lookahead_term(mb.logprobs_B_T_V, ids_B_T_K, rewards_B_T_K, student_mask_B_T)
            loss_B_T = loss_B_T + cfg.lookahead_coef * term_B_T
        if teacher_B_T.any():  # TRD: the likelihood of the teacher's continuation (forward KL on its samples)
            teacher_mask_B_T = mask_B_T * teacher_B_T
            self.sums[6] += float(teacher_mask_B_T.sum())
            loss_B_T = loss_B_T + losses.policy_gradient_loss(q_tok_B_T, teacher_mask_B_T, teacher_mask_B_T)
        return loss_B_T

    def _surrogate(
        self, rows: list[Rollout], q_tok_B_T: torch.Tensor, adv_B_T: torch.Tensor, mask_B_T: torch.Tensor
    ) -> torch.Tensor:
        cfg = self.signal.cfg
        kind = cfg.off_policy_correction
        if kind == "off":
            return losses.policy_gradient_loss(q_tok_B_T, adv_B_T, mask_B_T)
        mu_B_T = off_policy.behaviour_tensor([r.behaviour_logprobs for r in rows], mask_B_T.shape[1])
        bound = {"truncate": cfg.is_cap, "clip": cfg.ppo_clip, "drpo": cfg.drpo_delta}[kind]
        ratio_sum, log_sum, acted, ratio_max = off_policy.ratio_stats(
            q_tok_B_T.detach(), mu_B_T, adv_B_T, mask_B_T, kind, bound
        )
        self.sums[0] += ratio_sum
        self.sums[1] += log_sum
        self.sums[2] += acted
        self.sums[3] += float(mask_B_T.sum())
        self.ratio_max = max(self.ratio_max, ratio_max)
        if kind == "truncate":
            return off_policy.truncated_is_loss(q_tok_B_T, mu_B_T, adv_B_T, mask_B_T, cfg.is_cap)
        if kind == "clip":
            return off_policy.ppo_clip_loss(q_tok_B_T, mu_B_T, adv_B_T, mask_B_T, cfg.ppo_clip)
        return off_policy.drpo_loss(q_tok_B_T, mu_B_T, adv_B_T, mask_B_T, cfg.drpo_delta)

    def finish_gradients(self, params: list[torch.nn.Parameter]) -> None:
        self.sums = self.world.sum(self.sums)
        self.ratio_max = self.world.max(self.ratio_max)
        super().finish_gradients(params)

    def metrics(self) -> dict[str, Any]:
        cfg = self.signal.cfg
        out = super().metrics()
        ratio_sum, log_sum, acted, ratio_tokens, kept, routed_n, teacher_n, extra, adv_sum, adv_n = self.sums
        out["pg/advantage_mean"] = adv_sum / max(1.0, adv_n)
        if cfg.off_policy_correction != "off":
            out["offpolicy/ratio_mean"] = ratio_sum / max(1.0, ratio_tokens)
            out["offpolicy/abs_log_ratio_mean"] = log_sum / max(1.0, ratio_tokens)
            out["offpolicy/corrected_fraction"] = acted / max(1.0, ratio_tokens)
            out["offpolicy/ratio_max"] = self.ratio_max
        if cfg.near_future_window > 0:
            out["pg/near_future_kept"] = kept / max(1.0, adv_n)
        if cfg.cr_opd:
            out["pg/routed_fraction"] = routed_n / max(1.0, adv_n)
        if cfg.lookahead_group:
            out["teacher/lookahead_positions"] = int(extra)
        if teacher_n:
            out["trd/teacher_tokens"] = int(teacher_n)
        return out


def _teacher_written(rows: list[Rollout], horizon: int) -> torch.Tensor:
    """1.0 at the completion tokens TRD's teacher wrote (from each row's teacher_from on), [B, T]."""
    out_B_T = torch.zeros((len(rows), horizon))
    for b, r in enumerate(rows):
        if r.teacher_from is not None:
            out_B_T[b, r.teacher_from : len(r.completion_ids)] = 1.0
    return out_B_T


class StudentTopKForm(StudentTopK):
    """student_topk_reverse_kl in a stop-gradient form of the study (student_topk_form, methods/topk_forms.py)."""

    def loss(self, logprobs_B_T_V, q_tok_B_T, teacher, mask_B_T, score_ids_B_T_K, teachers_B):
        assert teacher.score_logprobs_B_T_M is not None, "score_ids are answered with their logprobs"
        return topk_forms.truncated_topk_reverse_kl(
            logprobs_B_T_V,
            score_ids_B_T_K,
            teacher.score_logprobs_B_T_M,
            mask_B_T,
            stop_gradient=self.cfg.student_topk_form == "truncated_sg",
        )


def methods_signal(cfg) -> type[TokenScoreSignal] | None:
    """The signal class a run's Methods II options need instead of its loss's own (None: the loss's own)."""
    if cfg.loss == "reverse_kl" and sampled_token_methods(cfg):
        return PolicyGradient
    if cfg.loss == "student_topk_reverse_kl" and cfg.student_topk_form != "tail":
        return StudentTopKForm
    return None
