"""A teacher with another tokenizer (`cross_tokenizer = true`, loss reverse_kl): distillation over aligned
text spans.

Token ids mean different things on the two sides, so the teacher scores text: each rollout's completion as
the student's ids spell it, which the teacher tokenizes its own way (POST /v1/score-text). The two
tokenizations are aligned by byte spans (opd_student.alignment) and the loss runs over aligned spans
(docs/methods.md, cross-tokenizer distillation):

- sampled-token reverse KL per span: A_t = Σ_{u∈span} log p(u) − Σ_{s∈span} log q(x_s) for every student
  token of the span, trained as reverse_kl's policy gradient −A_t log q(x_t) (span_losses);
- `xtok_topk_coef` > 0: the forward KL on the teacher's top-k strings that are student tokens, plus a
  tail bucket, where each span opens (both sides' next-token distributions after the same text);
- `xtok_uld_coef` > 0: ULD's sorted-probability distance on the rest (span_losses.uld_rest_l1).

A same-tokenizer teacher never gets here: with `cross_tokenizer` the run still uses the token-level
signals when the tokenizers match (signals.make_signal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from opd_client.schema import ModelInfo, TextSequenceScores
from opd_client.token_bytes import vocab_bytes
from opd_student import losses
from opd_student.config import TrainConfig
from opd_student.distributed import World
from opd_student.microbatch import MicroBatch
from opd_student.prompts import Prompt
from opd_student.rollout_factory import RolloutFactory
from opd_student.rollouts import Rollout
from opd_student.signals.base import EvalResult
from opd_student.span_losses import span_reverse_kl_advantages, uld_rest_l1
from opd_student.student_model import Student
from opd_student.teacher_link import Pending, TeacherLink
from opd_student.text_evaluation import evaluate_by_text, text_eval_summary
from opd_student.text_scores import (
    AlignedRollout,
    StudentText,
    align_rollout,
    aligned_tensors,
    student_ids_by_text,
    student_text,
    text_request,
)

# Methods that weight tokens by the teacher's token-level scores (its top-k at the student's ids).
_TOKEN_LEVEL_METHODS = ("ta_opd", "fire_opd", "loss_token_ids", "loss_regex")


@dataclass
class TextRequest:
    pending: Pending
    texts: list[StudentText]


@dataclass
class TextFeedback:
    answers: list[TextSequenceScores]
    texts: list[StudentText]


class CrossTokenizer:
    progress = ("kl", "kl/sampled_reverse")

    def __init__(
        self, cfg: TrainConfig, student: Student, link: TeacherLink, factory: RolloutFactory, methods: Any
    ) -> None:
        used = [name for name in _TOKEN_LEVEL_METHODS if getattr(cfg, name)]
        if used:
            raise SystemExit(
                f"error: {', '.join(used)} weight tokens by the teacher's token-level scores, which a teacher "
                "with another tokenizer does not give; turn them off for a cross_tokenizer run"
            )
        if cfg.discount > 0:
            raise SystemExit(
                f"error: discount = {cfg.discount}: a cross_tokenizer run's advantage is each aligned span's own "
                "sampled reverse KL (no return-to-go over spans); use discount = 0"
            )
        self.cfg, self.student, self.link, self.factory = cfg, student, link, factory
        self.vocab = vocab_bytes(student.tokenizer)
        self.eos_token_id = int(student.tokenizer.eos_token_id)  # type: ignore[attr-defined]
        self.dense = cfg.xtok_topk_coef > 0 or cfg.xtok_uld_coef > 0
        self.by_text = student_ids_by_text(self.vocab) if self.dense else None

    def check_teacher(self, info: ModelInfo, url: str) -> None:
        if info.black_box:
            raise SystemExit(
                f"error: teacher {info.name!r} at {url} is black-box ({info.source}): it has no logprobs of "
                "given text for cross_tokenizer; use --loss chunk"
            )

    def request(self, rollouts: list[Rollout]) -> TextRequest:
        texts = [student_text(r, self.vocab, self.eos_token_id) for r in rollouts]
        top_k = self.cfg.top_k if self.dense else 0
        requests = [text_request(r, text, top_k) for r, text in zip(rollouts, texts, strict=True)]
        return TextRequest(self.link.submit_text(requests), texts)

    def collect(self, request: TextRequest) -> TextFeedback:
        answers: list[TextSequenceScores] = self.link.collect(request.pending)
        return TextFeedback(answers, request.texts)

    def step_loss(self, rollouts: list[Rollout], feedback: TextFeedback) -> SpanStepLoss:
        aligned = [
            align_rollout(text, answer, self.by_text, self.eos_token_id)
            for text, answer in zip(feedback.texts, feedback.answers, strict=True)
        ]
        return SpanStepLoss(self, rollouts, aligned)

    def evaluate(self, student: Student, prompts: list[Prompt], seed: int) -> EvalResult:
        result = evaluate_by_text(
            student.scorer,
            student.tokenizer,
            self.link,
            prompts,
            self.factory,
            self.cfg.eval_max_new_tokens,
            seed=seed,
            world=student.world,
        )
        return EvalResult(result, text_eval_summary(result))


class SpanStepLoss:
    """One step over aligned spans; the step's numbers are summed over ranks in finish_gradients."""

    def __init__(
        self, signal: CrossTokenizer, rollouts: list[Rollout], aligned: list[AlignedRollout]
    ) -> None:
        self.signal, self.cfg, self.aligned = signal, signal.cfg, aligned
        self.sequences = rollouts
        self.world: World = signal.student.world
        local_tokens = sum(len(r.completion_ids) for r in rollouts)
        self.normaliser = self.world.sum([local_tokens])[0]
        self.sums = {
            "loss": 0.0,
            "kl": 0.0,
            "topk": 0.0,
            "uld": 0.0,
            "matched": 0.0,
            "teacher_lp": sum(a.teacher_logprob for a in aligned),
            "bytes": float(sum(a.num_bytes for a in aligned)),
            "spans": float(sum(a.num_spans for a in aligned)),
            "teacher_tokens": float(sum(a.teacher_tokens for a in aligned)),
            "rollouts": float(len(rollouts)),
        }

    def per_token_loss(self, mb: MicroBatch) -> torch.Tensor:
        mask_B_T = mb.mask_B_T
        rows = aligned_tensors([self.aligned[i] for i in mb.idx], mask_B_T.shape[1])
        q_tok_B_T = mb.token_logprobs_B_T
        adv_B_T = span_reverse_kl_advantages(
            q_tok_B_T.detach(), rows.span_B_T, rows.teacher_span_logprob_B_G, mask_B_T
        )
        per_token_B_T = losses.policy_gradient_loss(q_tok_B_T, adv_B_T, mask_B_T)
        opens_B_T = rows.opens_B_T * mask_B_T
        if self.signal.dense:
            assert rows.top_ids_B_T_K is not None and rows.top_logprobs_B_T_K is not None
            assert rows.matched_B_T_K is not None
            args = (mb.logprobs_B_T_V, rows.top_logprobs_B_T_K, rows.top_ids_B_T_K, rows.matched_B_T_K)
            p_matched_B_T = (rows.top_logprobs_B_T_K.exp() * rows.matched_B_T_K).sum(-1)
            self.sums["matched"] += (p_matched_B_T * opens_B_T).sum().item()
            if self.cfg.xtok_topk_coef > 0:
                topk_B_T = losses.ragged_topk_forward_kl(
                    mb.logprobs_B_T_V,
                    rows.top_ids_B_T_K,
                    rows.top_logprobs_B_T_K,
                    rows.matched_B_T_K,
                    opens_B_T,
                )
                per_token_B_T = per_token_B_T + self.cfg.xtok_topk_coef * topk_B_T
                self.sums["topk"] += topk_B_T.sum().item()
            if self.cfg.xtok_uld_coef > 0:
                uld_B_T = uld_rest_l1(*args, opens_B_T)
                per_token_B_T = per_token_B_T + self.cfg.xtok_uld_coef * uld_B_T
                self.sums["uld"] += uld_B_T.sum().item()
        self.sums["loss"] += per_token_B_T.sum().item()
        # Σ over the rollouts' spans of log q − log p: the sampled reverse KL of their texts
        log_q = (q_tok_B_T.detach().float() * mask_B_T).sum().item()
        self.sums["kl"] += log_q - rows.teacher_span_logprob_B_G.sum().item()
        return per_token_B_T

    def finish_gradients(self, params: list[torch.nn.Parameter]) -> None:
        keys = list(self.sums)
        self.sums = dict(zip(keys, self.world.sum([self.sums[k] for k in keys]), strict=True))

    def metrics(self) -> dict[str, Any]:
        s, tokens = self.sums, self.normaliser
        out = {
            "loss": s["loss"] / tokens,
            "kl/sampled_reverse": s["kl"] / tokens,  # nats per student token
            "kl/sampled_reverse_per_byte": s["kl"] / max(1.0, s["bytes"]),
            "teacher/logprob": s["teacher_lp"] / tokens,
            "tokens": int(tokens),
            "rollouts": int(s["rollouts"]),
            "on_policy": int(self.sequences[0].on_policy),
            "completion_len": tokens / s["rollouts"],
            "xtok/bytes": int(s["bytes"]),
            "xtok/spans": int(s["spans"]),
            "xtok/teacher_tokens": int(s["teacher_tokens"]),
            "xtok/student_tokens_per_span": tokens / max(1.0, s["spans"]),
        }
        if self.signal.dense:
            out["xtok/matched_mass"] = s["matched"] / max(1.0, s["spans"])
        if self.cfg.xtok_topk_coef > 0:
            out["xtok/topk_forward_kl"] = s["topk"] / max(1.0, s["spans"])
        if self.cfg.xtok_uld_coef > 0:
            out["xtok/uld"] = s["uld"] / max(1.0, s["spans"])
        return out
