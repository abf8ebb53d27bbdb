"""`--loss chunk`: on-policy distillation from a black-box teacher (an OpenAI-compatible chat API).

The teacher gives no logprobs of the student's tokens, only text. Per rollout the trainer sends the chat the
teacher sees and the completion (one string per student token) with the student's entropy at each token to
POST /v1/chunk-score; the service picks M chunks where the student was least sure, has the teacher continue
each chunk's prefix N times, and rewards the chunk by how many continuations say the same thing
(opd_teacher.blackbox.chunk_scorer). The loss is then

    Σ_chunks −(r_c − b) · Σ_{t ∈ c} log q(x_t)  +  β · Σ_{t ∉ chunks} KL(q_t ‖ q0_t)

r_c the chunk's reward, b the step's mean reward (chunk_baseline), q0 the initial student (frozen), β =
chunk_kl_coef; all divided by the step's completion tokens, as the other losses. With chunk_kd_coef = λ > 0
the teacher's greedy continuation of each chunk's prefix comes back with the API's top logprobs and

    + λ · mean over continuation positions of KL(p_topk+tail ‖ q)        (signals/continuation_kd.py)

is added; with chunk_samples = 0 no samples are drawn and the reward term is off (one API call a chunk).
Under torchrun each rank scores its share of the rollouts; the baseline, the token counts and the logged
numbers are the whole step's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from opd_client.schema import ChatMessage, ChunkScore, ChunkScoreRequest, ChunkScoreResponse, ModelInfo
from opd_student import losses
from opd_student.config import TrainConfig
from opd_student.distributed import World
from opd_student.evaluation import heldout_rollouts
from opd_student.microbatch import MicroBatch, no_grad_pass
from opd_student.prompts import Prompt
from opd_student.rollout_factory import RolloutFactory
from opd_student.rollouts import Rollout, student_logprobs
from opd_student.signals.base import EvalResult
from opd_student.signals.continuation_kd import (
    KdSequence,
    TokenTable,
    heldout_kd,
    kd_sequences,
    kd_tensors,
    padding_sequence,
)
from opd_student.signals.white_box_eval import WhiteBoxEval
from opd_student.student_model import Student
from opd_student.teacher_link import Pending, TeacherLink


def keeps_initial_weights(cfg: TrainConfig) -> bool:
    """The KL outside chunks needs a frozen copy of the initial student."""
    return cfg.chunk_kl_coef > 0


class ChunkRewards:
    progress = ("reward", "chunk/reward")

    def __init__(
        self, cfg: TrainConfig, student: Student, link: TeacherLink, factory: RolloutFactory
    ) -> None:
        self.cfg, self.student, self.link, self.factory = cfg, student, link, factory
        self.white_box = WhiteBoxEval(cfg, student, factory) if cfg.eval_teacher_url else None
        self.table = TokenTable(student.tokenizer, student.eos_token_id) if cfg.chunk_kd_coef > 0 else None

    def check_teacher(self, info: ModelInfo, url: str) -> None:
        if not info.black_box:
            raise SystemExit(
                f"error: --loss chunk needs a black-box teacher (opd serve-teacher --backend openai); "
                f"teacher {info.name!r} at {url} is white-box: use a logprob loss such as reverse_kl"
            )

    def request(self, rollouts: list[Rollout]) -> Pending:
        entropies = self.entropies(rollouts) if self.cfg.chunk_select == "entropy" else None
        return self.link.submit_chunks(chunk_requests(self.cfg, self.student.tokenizer, rollouts, entropies))

    def entropies(self, rollouts: list[Rollout]) -> list:
        """entropies_R_T: the student's entropy (nats) of its next-token distribution at each completion token."""

        def per_rollout(mb: MicroBatch) -> list:
            logprobs_B_T_V = mb.logprobs_B_T_V.float()
            entropy_B_T = -(logprobs_B_T_V.exp() * logprobs_B_T_V).sum(-1)
            return [entropy_B_T[b, : len(rollouts[i].completion_ids)].tolist() for b, i in enumerate(mb.idx)]

        return no_grad_pass(self.student, rollouts, self.cfg.micro_batch_size, per_rollout)

    def collect(self, pending: Pending) -> list[ChunkScoreResponse]:
        return self.link.collect(pending)

    def step_loss(self, rollouts: list[Rollout], responses: list[ChunkScoreResponse]) -> ChunkStepLoss:
        kd = kd_sequences(rollouts, responses, self.table) if self.table is not None else []
        return ChunkStepLoss(self.cfg, self.student, rollouts, responses, kd)

    def evaluate(self, student: Student, prompts: list[Prompt], seed: int) -> EvalResult:
        """Held-out chunk reward: one seeded sample per prompt, chunks spread evenly (the same positions
        whatever the student's entropies), scored by the black-box teacher."""
        responses, tokens, kd_sum, kd_positions = [], 0, 0.0, 0
        for rollouts in heldout_rollouts(
            student.scorer, student.tokenizer, self.factory, prompts, self.cfg.eval_max_new_tokens, seed,
            world=student.world,
        ):  # fmt: skip
            requests = chunk_requests(self.cfg, student.tokenizer, rollouts, None)
            answers = self.link.collect(self.link.submit_chunks(requests))
            responses += answers
            tokens += sum(len(r.completion_ids) for r in rollouts)
            if self.table is not None:
                seqs = kd_sequences(rollouts, answers, self.table)
                part_sum, part_positions = heldout_kd(student, seqs, rollouts[0], self.cfg.micro_batch_size)
                kd_sum, kd_positions = kd_sum + part_sum, kd_positions + part_positions
        world = student.world
        responses = _all_ranks(world, responses)
        rewards = [chunk_reward(self.cfg, c) for r in responses for c in r.chunks]
        out = chunk_metrics(responses, rewards, "eval/chunk_", self.cfg)
        out = {k.replace("api/", "eval/api_"): v for k, v in out.items()}
        n_prompts = len(prompts) - (len(prompts) % world.size if world.distributed else 0)
        metrics = {**out, "eval/tokens": int(world.sum([tokens])[0]), "eval/prompts": n_prompts}
        summary = f"accepted {metrics['eval/chunk_accept_rate']:.3f}"
        if self.cfg.chunk_samples > 0:
            summary = (
                f"chunk reward {metrics['eval/chunk_reward']:.4f}, similarity "
                f"{metrics['eval/chunk_similarity']:.4f}, {summary}"
            )
        if self.table is not None:  # the teacher's continuations: the KD term's own held-out measure
            total_kl, total_positions = world.sum([kd_sum, kd_positions])
            metrics["eval/kd_forward_kl"] = total_kl / max(1.0, total_positions)
            metrics["eval/kd_positions"] = int(total_positions)
            summary += f", top-{self.cfg.chunk_top_logprobs} forward KL on the teacher's continuations "
            summary += f"{metrics['eval/kd_forward_kl']:.4f}"
        if self.white_box is not None:  # the same seeded samples, scored by the open copy
            white = self.white_box.evaluate(student, prompts, seed)
            metrics |= white.metrics
            summary += f"; {white.summary}"
        return EvalResult(metrics, summary)


class ChunkStepLoss:
    """The step's sequences are its rollouts, then the teacher's continuations (`kd`), then padding up to
    the largest rank's count; a micro-batch may hold both kinds, each row gets its own term."""

    def __init__(
        self,
        cfg: TrainConfig,
        student: Student,
        rollouts: list[Rollout],
        responses: list[ChunkScoreResponse],
        kd: list[KdSequence],
    ) -> None:
        self.cfg, self.student, self.responses = cfg, student, responses
        self.world: World = student.world
        self.everyone = _all_ranks(self.world, responses)  # the whole step's chunks: baseline and metrics
        self.rewards = [chunk_reward(cfg, c) for r in self.everyone for c in r.chunks]
        self.use_reward = cfg.chunk_samples > 0
        self.baseline = float(np.mean(self.rewards)) if cfg.chunk_baseline and self.rewards else 0.0
        self.normaliser = self.world.sum([sum(len(r.completion_ids) for r in rollouts)])[0]
        self.num_rollouts = float(len(rollouts))
        width = int(self.world.max(len(rollouts) + len(kd)))
        self.kd: list[KdSequence] = kd + [padding_sequence(rollouts[0])] * (width - len(rollouts) - len(kd))
        self.sequences = rollouts + [s.rollout for s in self.kd]
        self.kd_tokens = self.world.sum([sum(len(s.top_ids_T_K) for s in kd)])[0]
        self.kd_sequences = float(len(kd))
        self.loss_sum = self.kl_sum = self.outside_tokens = self.kd_sum = self.kd_mass = 0.0

    def per_token_loss(self, mb: MicroBatch) -> torch.Tensor:
        R = len(self.responses)
        responses_B = [self.responses[i] if i < R else None for i in mb.idx]
        rollout_B = torch.tensor([float(i < R) for i in mb.idx])
        weights_B_T, chunk_B_T = chunk_weights(self.cfg, responses_B, mb.mask_B_T.shape, self.baseline)
        if not self.use_reward:
            weights_B_T = torch.zeros_like(weights_B_T)
        per_token_B_T = losses.chunk_weighted_nll(mb.token_logprobs_B_T, weights_B_T, chunk_B_T)
        outside_B_T = mb.mask_B_T * (1.0 - chunk_B_T) * rollout_B[:, None]
        initial = self.student.initial
        if self.cfg.chunk_kl_coef > 0 and initial is not None:
            device = self.student.device
            with (
                torch.no_grad(),
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.student.bf16),
            ):
                reference_B_T_V = student_logprobs(initial, mb.batch).cpu()
            kl_B_T = losses.reverse_kl_to_reference(mb.logprobs_B_T_V, reference_B_T_V, outside_B_T)
            per_token_B_T = per_token_B_T + self.cfg.chunk_kl_coef * kl_B_T
            self.kl_sum += kl_B_T.sum().item()
        if self.kd_tokens > 0:
            per_token_B_T = per_token_B_T + self._kd_loss(mb, R)
        self.loss_sum += per_token_B_T.sum().item()
        self.outside_tokens += outside_B_T.sum().item()
        return per_token_B_T

    def _kd_loss(self, mb: MicroBatch, R: int) -> torch.Tensor:
        """λ · KL on the continuation rows, scaled so that over the step it is λ times their mean per
        continuation position (the micro-batch loop divides every row by the rollouts' token count)."""
        kd_B = [self.kd[i - R] if i >= R else None for i in mb.idx]
        ids_B_T_K, lps_B_T_K, present_B_T_K = kd_tensors(kd_B, mb.mask_B_T.shape[1])
        rows_B_T = torch.tensor([float(s is not None) for s in kd_B])[:, None] * mb.mask_B_T
        kl_B_T = losses.ragged_topk_forward_kl(
            mb.logprobs_B_T_V, ids_B_T_K, lps_B_T_K, present_B_T_K, rows_B_T
        )
        self.kd_sum += kl_B_T.detach().sum().item()
        self.kd_mass += (lps_B_T_K.exp() * present_B_T_K).sum().item()
        return kl_B_T * (self.cfg.chunk_kd_coef * self.normaliser / self.kd_tokens)

    def finish_gradients(self, params: list[torch.nn.Parameter]) -> None:
        (
            self.loss_sum, self.kl_sum, self.outside_tokens, self.num_rollouts, self.kd_sum, self.kd_mass,
            self.kd_sequences,
        ) = self.world.sum(
            [
                self.loss_sum, self.kl_sum, self.outside_tokens, self.num_rollouts, self.kd_sum,
                self.kd_mass, self.kd_sequences,
            ]
        )  # fmt: skip

    def metrics(self) -> dict[str, Any]:
        tokens = self.normaliser
        return {
            "loss": self.loss_sum / tokens,
            **chunk_metrics(self.everyone, self.rewards, "chunk/", self.cfg),
            "chunk/baseline": self.baseline,
            "chunk/token_fraction": 1.0 - self.outside_tokens / tokens,
            "kl/initial": self.kl_sum / max(1.0, self.outside_tokens),
            **self._kd_metrics(),
            "tokens": int(tokens),
            "rollouts": int(self.num_rollouts),
            "on_policy": 1,
            "completion_len": tokens / self.num_rollouts,
        }

    def _kd_metrics(self) -> dict[str, Any]:
        if self.cfg.chunk_kd_coef <= 0:
            return {}
        positions = max(1.0, self.kd_tokens)
        return {
            "kd/forward_kl": self.kd_sum / positions,  # mean top-k + tail KL at the continuation positions
            "kd/positions": int(self.kd_tokens),
            "kd/sequences": int(self.kd_sequences),
            "kd/topk_mass": self.kd_mass / positions,  # the teacher's mass on mapped alternatives
        }


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """One string per token whose concatenation is the decoded text (special tokens such as EOS are "").

    Decoding token by token would split multi-byte characters into replacement marks; decoding growing
    prefixes and taking the new characters keeps every character whole: a token that ends inside a
    character gets "" and the next one carries the character.
    """
    pieces, emitted = [], ""
    for t in range(len(ids)):
        text = tokenizer.decode(ids[: t + 1], skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(emitted):
            pieces.append("")
            continue
        pieces.append(text[len(emitted) :])
        emitted = text
    final = tokenizer.decode(ids, skip_special_tokens=True)
    if final != emitted and final.startswith(emitted):
        pieces[-1] += final[len(emitted) :]
    return pieces


def _teacher_messages(rollout: Rollout) -> list[ChatMessage]:
    """The chat the black-box teacher sees (the rollout factory gives every rollout one)."""
    assert rollout.teacher_chat is not None, "a black-box teacher's rollout carries its teacher_chat"
    return [ChatMessage.model_validate(m) for m in rollout.teacher_chat]


def chunk_requests(
    cfg: TrainConfig, tokenizer, rollouts: list[Rollout], entropies_R_T: list | None
) -> list[ChunkScoreRequest]:
    return [
        ChunkScoreRequest(
            model=r.teacher,
            messages=_teacher_messages(r),
            completion=token_pieces(tokenizer, r.completion_ids),
            entropies=entropies_R_T[i] if entropies_R_T is not None else None,
            num_chunks=cfg.chunk_num,
            chunk_tokens=cfg.chunk_tokens,
            num_samples=cfg.chunk_samples,
            temperature=cfg.chunk_teacher_temperature,
            similarity_threshold=cfg.chunk_threshold,
            prior=cfg.chunk_prior,
            alpha=cfg.chunk_alpha,
            top_logprobs=cfg.chunk_top_logprobs,
            continuation_tokens=cfg.chunk_continuation_tokens or None,
            return_teacher_tokens=cfg.chunk_kd_coef > 0,
        )
        for i, r in enumerate(rollouts)
    ]


def chunk_reward(cfg: TrainConfig, chunk: ChunkScore) -> float:
    if cfg.chunk_reward == "similarity":
        return chunk.similarity
    if cfg.chunk_reward == "edit_similarity":
        return chunk.edit_similarity
    return chunk.reward


def _all_ranks(world: World, responses: list[ChunkScoreResponse]) -> list[ChunkScoreResponse]:
    """Every rank's responses in rank order (= the 1-process order of the step's rollouts)."""
    return [r for part in world.gather(responses) for r in part]


def chunk_weights(
    cfg: TrainConfig, responses_B: list[ChunkScoreResponse | None], shape_B_T: tuple, baseline: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_B_T = chunk reward − baseline on each chunk's tokens, chunk_mask_B_T), zeros elsewhere and
    on rows without a response (the teacher's continuations)."""
    weights_B_T, chunk_B_T = torch.zeros(shape_B_T), torch.zeros(shape_B_T)
    for b, response in enumerate(responses_B):
        for c in response.chunks if response is not None else []:
            weights_B_T[b, c.start : c.end] = chunk_reward(cfg, c) - baseline
            chunk_B_T[b, c.start : c.end] = 1.0
    return weights_B_T, chunk_B_T


def chunk_metrics(
    responses: list[ChunkScoreResponse], rewards: list[float], prefix: str, cfg: TrainConfig
) -> dict:
    """Mean chunk reward and similarities, the speculative acceptance rate, and the API's bill (its cost
    too when cfg gives prices per million tokens)."""
    chunks = [c for r in responses for c in r.chunks]
    n = max(1, len(chunks))
    chunk_tokens = sum(c.end - c.start for c in chunks)
    usage = [r.usage for r in responses]
    prompt_tokens = sum(u.prompt_tokens for u in usage)
    completion_tokens = sum(u.completion_tokens for u in usage)
    cost = {}
    if cfg.api_prompt_price or cfg.api_completion_price:
        cost["api/cost"] = (
            prompt_tokens * cfg.api_prompt_price + completion_tokens * cfg.api_completion_price
        ) / 1e6
    return {
        **cost,
        f"{prefix}reward": sum(rewards) / n,
        f"{prefix}smoothed_reward": sum(c.reward for c in chunks) / n,
        f"{prefix}similarity": sum(c.similarity for c in chunks) / n,
        f"{prefix}edit_similarity": sum(c.edit_similarity for c in chunks) / n,
        f"{prefix}accept_rate": sum(c.accepted_tokens for c in chunks) / max(1, chunk_tokens),
        f"{prefix}chunks": len(chunks),
        "api/requests": sum(u.requests for u in usage),
        "api/retries": sum(u.retries for u in usage),
        "api/prompt_tokens": prompt_tokens,
        "api/completion_tokens": completion_tokens,
        "api/tokens": prompt_tokens + completion_tokens,
    }
