"""White-box teachers: token scores from POST /v1/score (the teacher's logprob of each completion token,
its top-k with the tail mass, and logprobs of ids the trainer names).

Three signals share the request, the bookkeeping and the evaluation, and differ in the per-token loss:

- SampledToken (`loss = "reverse_kl"`): the sampled token's log p − log q as a per-token advantage
  (policy gradient of the sampled reverse KL; tinker-cookbook / Thinking Machines' on-policy distillation);
- TeacherTopK (`"topk_forward_kl"`, `"jsd"`): KL(p‖q) or GKD's JSD(β) on the teacher's top-k + tail;
- StudentTopK (`"student_topk_reverse_kl"`): KL(q‖p) on the student's own top-k, which the teacher scores
  through `score_ids` (the ids come from a no-grad student pass when the batch is sent).

The methods of docs/methods.md (TA-OPD, FiRe, token masks) weight these signals' tokens (StepWeights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from opd_client.schema import ModelInfo
from opd_client.scores import SequenceScores
from opd_student import losses
from opd_student.config import TrainConfig
from opd_student.distributed import World
from opd_student.evaluation import eval_summary, evaluate
from opd_student.methods.evidence import EvidenceRequest, evidence_per_rollout, request_plain_scores
from opd_student.methods.options import MethodOptions
from opd_student.methods.teacher_metrics import TeacherMetrics
from opd_student.microbatch import MicroBatch, no_grad_pass
from opd_student.prompts import Prompt
from opd_student.rollout_factory import RolloutFactory
from opd_student.rollouts import Rollout, TeacherTensors, teacher_tensors
from opd_student.signals.base import EvalResult
from opd_student.signals.white_box_eval import WhiteBoxEval
from opd_student.student_model import Student
from opd_student.teacher_heads import TeacherHeads, offers_hidden_states
from opd_student.teacher_link import Pending, TeacherLink


@dataclass
class TokenRequest:
    pending: Pending
    score_ids: list | None  # per rollout, the [T][K] ids the teacher was asked to score (StudentTopK)
    evidence: EvidenceRequest | None = None  # evidence_mask: the same rollouts without privileged context


@dataclass
class TokenFeedback:
    scores: list[SequenceScores]
    score_ids: list | None
    evidence_N_T: list | None = None  # evidence_mask: per rollout e_T, or None without privileged context


class TokenScoreSignal:
    """The shared part; subclasses implement `loss`."""

    progress = ("kl", "kl/sampled_reverse")

    def __init__(
        self,
        cfg: TrainConfig,
        student: Student,
        link: TeacherLink,
        factory: RolloutFactory,
        methods: MethodOptions,
    ) -> None:
        self.cfg, self.student, self.link, self.factory, self.methods = cfg, student, link, factory, methods

        # Held-out evaluation adds the exact full-vocabulary KLs when every teacher serves hidden states.
        self.exact_eval = True
        self._heads: TeacherHeads | None = None
        # eval_teacher_url: the held-out KL against that fixed service instead (a teacher that learns,
        # teacher_follows_student, is no fixed yardstick)
        self.eval_teacher = WhiteBoxEval(cfg, student, factory) if cfg.eval_teacher_url else None

    @property
    def heads(self) -> TeacherHeads:
        if self._heads is None:
            self._heads = TeacherHeads(self.link.client, self.student.device)
        return self._heads

    def check_teacher(self, info: ModelInfo, url: str) -> None:
        if info.black_box:
            raise SystemExit(
                f"error: teacher {info.name!r} at {url} is black-box ({info.source}): it has no logprobs for "
                f"--loss {self.cfg.loss}; use --loss chunk"
            )
        # A teacher that follows the student changes its head at every push; the head is fetched once.
        following = self.cfg.teacher_follows_student > 0
        self.exact_eval = self.exact_eval and offers_hidden_states(info) and not following

    def score_ids(self, rollouts: list[Rollout]) -> list | None:
        """Ids whose teacher logprobs the loss needs beyond the top-k (None: none)."""
        return None

    def request(self, rollouts: list[Rollout]) -> TokenRequest:
        score_ids = self.score_ids(rollouts)
        pending = self.link.submit(rollouts, self.cfg.top_k, score_ids)
        return TokenRequest(pending, score_ids, self.evidence_request(rollouts))

    def evidence_request(self, rollouts: list[Rollout]) -> EvidenceRequest | None:
        """evidence_mask: the privileged rollouts scored after the student's own prompt too."""
        return request_plain_scores(self.link, rollouts) if self.cfg.evidence_mask else None

    def collect(self, request: TokenRequest) -> TokenFeedback:
        evidence = request.evidence
        plain = self.link.collect(evidence.pending) if evidence is not None else None
        scores = self.link.collect(request.pending)  # last: teacher_follow reads this collect's versions
        evidence_N_T = evidence_per_rollout(evidence, plain, scores) if evidence and plain else None
        return TokenFeedback(scores, request.score_ids, evidence_N_T)

    def step_loss(self, rollouts: list[Rollout], feedback: TokenFeedback) -> TokenStepLoss:
        return TokenStepLoss(self, rollouts, feedback)

    def loss(
        self,
        logprobs_B_T_V: torch.Tensor,
        q_tok_B_T: torch.Tensor,
        teacher: TeacherTensors,
        mask_B_T: torch.Tensor,
        score_ids_B_T_K: torch.Tensor | None,
        teachers_B: list[str | None],
    ) -> torch.Tensor:
        """The masked per-token loss [B, T] of one micro-batch; teachers_B names each row's teacher."""
        raise NotImplementedError

    def evaluate(self, student: Student, prompts: list[Prompt], seed: int) -> EvalResult:
        if self.eval_teacher is not None:
            return self.eval_teacher.evaluate(student, prompts, seed)
        result = evaluate(
            student.scorer,
            student.tokenizer,
            self.link,
            prompts,
            self.factory,
            self.cfg.eval_max_new_tokens,
            seed=seed,
            world=student.world,
            heads=self.heads if self.exact_eval else None,
        )
        return EvalResult(result, eval_summary(result))


class SampledToken(TokenScoreSignal):
    def loss(self, logprobs_B_T_V, q_tok_B_T, teacher, mask_B_T, score_ids_B_T_K, teachers_B):
        adv_B_T = losses.reverse_kl_advantages(
            q_tok_B_T.detach(), teacher.token_logprobs_B_T, mask_B_T, discount=self.cfg.discount
        )
        return losses.policy_gradient_loss(q_tok_B_T, adv_B_T, mask_B_T)


class TeacherTopK(TokenScoreSignal):
    def loss(self, logprobs_B_T_V, q_tok_B_T, teacher, mask_B_T, score_ids_B_T_K, teachers_B):
        args = (logprobs_B_T_V, teacher.top_ids_B_T_K, teacher.top_logprobs_B_T_K, teacher.tail_logprob_B_T)
        if self.cfg.loss == "topk_forward_kl":
            return losses.topk_forward_kl(*args, mask_B_T)
        return losses.generalized_jsd(*args, mask_B_T, beta=self.cfg.jsd_beta)


class StudentTopK(TokenScoreSignal):
    def score_ids(self, rollouts: list[Rollout]) -> list:
        """The student's top-k ids at each completion position, for the teacher to score."""
        k = self.cfg.top_k

        def top_ids(mb: MicroBatch) -> list:
            top_B_T_K = mb.logprobs_B_T_V.topk(k, dim=-1).indices
            return [top_B_T_K[b, : len(rollouts[i].completion_ids)].tolist() for b, i in enumerate(mb.idx)]

        return no_grad_pass(self.student, rollouts, self.cfg.micro_batch_size, top_ids)

    def loss(self, logprobs_B_T_V, q_tok_B_T, teacher, mask_B_T, score_ids_B_T_K, teachers_B):
        return losses.student_topk_reverse_kl(
            logprobs_B_T_V, score_ids_B_T_K, teacher.score_logprobs_B_T_M, mask_B_T
        )


class TokenStepLoss:
    """One step of a token-score signal: the methods' token weights, the per-token loss of each
    micro-batch, and the step's numbers (summed over ranks)."""

    def __init__(self, signal: TokenScoreSignal, rollouts: list[Rollout], feedback: TokenFeedback) -> None:
        self.signal, self.rollouts, self.feedback = signal, rollouts, feedback
        self.sequences = rollouts
        self.world: World = signal.student.world
        self.weights = signal.methods.step_weights(
            signal.student, rollouts, feedback.scores, feedback.evidence_N_T
        )
        self.per_teacher = TeacherMetrics() if signal.methods.several_teachers else None
        self.local_tokens = sum(len(r.completion_ids) for r in rollouts)
        self.normaliser = self.world.sum([self.local_tokens])[0]
        self.loss_sum = self.kl_sum = self.teacher_lp_sum = 0.0
        self.num_rollouts = float(len(rollouts))

    def per_token_loss(self, mb: MicroBatch) -> torch.Tensor:
        scores = self.feedback.scores
        teacher = teacher_tensors([scores[i] for i in mb.idx], mb.mask_B_T.shape[1])
        score_ids_B_T_K = None
        if self.feedback.score_ids is not None:
            assert teacher.score_logprobs_B_T_M is not None, "score_ids are answered with their logprobs"
            score_ids_B_T_K = torch.zeros_like(teacher.score_logprobs_B_T_M, dtype=torch.long)
            for b, i in enumerate(mb.idx):
                score_ids_B_T_K[b, : len(self.feedback.score_ids[i])] = torch.tensor(
                    self.feedback.score_ids[i]
                )
        q_tok_B_T = mb.token_logprobs_B_T
        names_B = [self.rollouts[i].teacher for i in mb.idx]
        per_token_B_T = self.token_loss(mb, q_tok_B_T, teacher, score_ids_B_T_K, names_B)
        weights_B_T = self.weights.micro_batch(list(mb.idx), mb.logprobs_B_T_V, teacher, mb.mask_B_T)
        if weights_B_T is not None:
            per_token_B_T = per_token_B_T * weights_B_T
        self.loss_sum += per_token_B_T.sum().item()
        kl_B_T = losses.sampled_reverse_kl(q_tok_B_T.detach(), teacher.token_logprobs_B_T, mb.mask_B_T)
        self.kl_sum += kl_B_T.sum().item()
        if self.per_teacher is not None:
            self.per_teacher.add(names_B, kl_B_T, teacher.token_logprobs_B_T, mb.mask_B_T)
        self.teacher_lp_sum += (teacher.token_logprobs_B_T * mb.mask_B_T).sum().item()
        return per_token_B_T

    def token_loss(
        self,
        mb: MicroBatch,
        q_tok_B_T: torch.Tensor,
        teacher: TeacherTensors,
        score_ids_B_T_K: torch.Tensor | None,
        names_B: list[str | None],
    ) -> torch.Tensor:
        """The signal's per-token loss of one micro-batch, before the methods' weights (a step loss that
        needs the rollouts themselves, signals/policy_gradient.py, overrides this)."""
        return self.signal.loss(mb.logprobs_B_T_V, q_tok_B_T, teacher, mb.mask_B_T, score_ids_B_T_K, names_B)

    def finish_gradients(self, params: list[torch.nn.Parameter]) -> None:
        self.weights.reduce(self.local_tokens, self.normaliser)
        self.loss_sum, self.kl_sum, self.teacher_lp_sum, self.num_rollouts = self.world.sum(
            [self.loss_sum, self.kl_sum, self.teacher_lp_sum, self.num_rollouts]
        )
        self.weights.rescale_gradients(params)

    def metrics(self) -> dict[str, Any]:
        tokens = self.normaliser
        return {
            "loss": self.loss_sum / self.weights.loss_denominator(),
            "kl/sampled_reverse": self.kl_sum / tokens,
            "teacher/logprob": self.teacher_lp_sum / tokens,
            "tokens": int(tokens),
            "rollouts": int(self.num_rollouts),
            "on_policy": int(self.rollouts[0].on_policy),
            "completion_len": tokens / self.num_rollouts,
            **self.weights.metrics(),
            **(self.per_teacher.record(self.world) if self.per_teacher is not None else {}),
        }
