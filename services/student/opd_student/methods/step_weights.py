"""One weight per completion token of an optimizer step: the glue between the methods and the trainer.

    w_t = [rollout kept (FiRe filter)] · [token matched (mask rules)] · [evidence e_t > τ (EDGE-OPD)]
          · [teacher confident (OPCoD gate)] · [among the most teachable (TA-OPD)]
          · (c^T_t · (1 − c^S_t) if FiRe reweighting)

and the step's loss is the weighted mean Σ_t w_t ℓ_t / Σ_t w_t (for 0/1 weights: the mean over the
selected tokens, so keeping 5% of the tokens does not shrink the update 20-fold). The trainer backpropagates
Σ w ℓ / N (N = the step's completion tokens) micro-batch by micro-batch, as without weights, and
`rescale_gradients` multiplies the accumulated gradient by N / Σ w before clipping: Σ w is known only
after the last micro-batch when the weights depend on the student (FiRe), and gradients are linear in the
loss, so this gives exactly the gradient of the weighted mean.

With no method on, `active` is False and the trainer's arithmetic is untouched.

Under torchrun each rank holds a contiguous share of the step's rollouts. FiRe's dropped rollouts and
TA-OPD's top fraction are chosen over the whole step: every rank gathers all ranks' scores (a few floats
per rollout or token), makes the 1-process choice on their concatenation and keeps its own slice.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd_client.scores import SequenceScores
from opd_student.distributed import SINGLE, World
from opd_student.methods.cognizance import cognizance_keep
from opd_student.methods.evidence import evidence_keep
from opd_student.methods.filtering import confidence_weights, rollout_keep_mask, teacher_mean_logprobs
from opd_student.methods.teachability import teachability, top_fraction
from opd_student.methods.token_mask import TokenMaskRule
from opd_student.microbatch import MicroBatch, no_grad_pass
from opd_student.rollouts import Rollout, TeacherTensors, teacher_tensors
from opd_student.student_model import Student


class StepWeights:
    def __init__(
        self,
        cfg,
        rollouts: list[Rollout],
        scores: list[SequenceScores],
        tokenizer,
        mask_rule: TokenMaskRule,
        world: World = SINGLE,
        evidence_N_T: list[Tensor | None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.world = world
        self.rollouts = rollouts
        spans_given = any(r.loss_spans for r in rollouts)
        # The evidence mask is on for the whole run (not only steps with privileged rollouts), so that every
        # rank and every step reports and normalises alike.
        self.evidence = bool(getattr(cfg, "evidence_mask", False))  # settings objects without it: off
        self.gate = str(getattr(cfg, "cognizance_gate", "off"))
        self.restricts = mask_rule.is_global or spans_given or self.evidence or self.gate != "off"
        self.fire = cfg.fire_opd
        self.active = self.restricts or self.fire or cfg.ta_opd
        self.total_tokens = sum(len(r.completion_ids) for r in rollouts)
        self.weight_sum = 0.0
        self.tokens_in_loss = 0
        self.dropped_rollouts = 0
        self.teachability_all = self.teachability_chosen = float("nan")
        # Weights that do not depend on the student: 1.0 / 0.0 per completion token of each rollout.
        self.static_N_T = [torch.ones(len(r.completion_ids)) for r in rollouts]
        if self.restricts:
            for i, r in enumerate(rollouts):
                keep = mask_rule.mask(r.completion_ids, tokenizer, r.loss_spans)
                if keep is not None:
                    self.static_N_T[i] *= torch.tensor(keep, dtype=torch.float32)
        # EDGE-OPD: (Σ e, tokens with evidence, tokens kept); summed over ranks in reduce()
        self.evidence_sums = [0.0, 0.0, 0.0]
        for i, evidence_T in enumerate(evidence_N_T or []):
            if evidence_T is not None:
                keep_T = evidence_keep(evidence_T, cfg.evidence_threshold)
                self.static_N_T[i] *= keep_T
                self.evidence_sums[0] += float(evidence_T.sum())
                self.evidence_sums[1] += len(evidence_T)
                self.evidence_sums[2] += float(keep_T.sum())
        # OPCoD: (tokens the teacher is confident on, tokens); summed over ranks in reduce()
        self.gate_sums = [0.0, 0.0]
        if self.gate != "off":
            for i, teacher_scores in enumerate(scores):
                keep_T = cognizance_keep(teacher_scores, self.gate, cfg.cognizance_threshold)
                self.static_N_T[i] *= keep_T
                self.gate_sums[0] += float(keep_T.sum())
                self.gate_sums[1] += len(keep_T)
        if self.fire and cfg.fire_drop_fraction > 0:
            means_N = teacher_mean_logprobs([torch.from_numpy(s.token_logprobs_T) for s in scores])
            all_means, mine = self._whole_step(means_N)
            keep_all = rollout_keep_mask(all_means, cfg.fire_drop_fraction)
            self.dropped_rollouts = int((~keep_all).sum())  # the step's, on every rank
            keep_N = keep_all[mine]
            for i in torch.nonzero(~keep_N).flatten().tolist():
                self.static_N_T[i].zero_()

    def select_teachable(self, teachability_N_T: list[Tensor]) -> None:
        """TA-OPD: keep the top `ta_fraction` of the still-eligible tokens of the step by teachability."""
        scores, mine = self._whole_step(torch.cat(teachability_N_T))
        eligible, _ = self._whole_step(torch.cat(self.static_N_T) > 0)
        chosen = top_fraction(scores, eligible, self.cfg.ta_fraction)
        if eligible.any():  # the step's means, on every rank
            self.teachability_all = float(scores[eligible].mean())
            self.teachability_chosen = float(scores[chosen].mean())
        chosen = chosen[mine]
        for i, part in enumerate(chosen.split([len(s) for s in self.static_N_T])):
            self.static_N_T[i] *= part.float()

    def _whole_step(self, local_N: Tensor) -> tuple[Tensor, slice]:
        """All ranks' entries concatenated in rank order (= the 1-process order), and where ours are."""
        parts = self.world.gather(local_N)
        start = sum(len(part) for part in parts[: self.world.rank])
        return torch.cat(parts), slice(start, start + len(local_N))

    def micro_batch(
        self, idx: list[int], logprobs_B_T_V: Tensor, teacher: TeacherTensors, mask_B_T: Tensor
    ) -> Tensor | None:
        """w_B_T for the rollouts at idx (None when no method is on: the loss stays unweighted)."""
        if not self.active:
            return None
        weights_B_T = torch.zeros_like(mask_B_T, dtype=torch.float32)
        for b, i in enumerate(idx):
            weights_B_T[b, : len(self.static_N_T[i])] = self.static_N_T[i]
        if self.fire and self.cfg.fire_reweight:
            weights_B_T = weights_B_T * confidence_weights(
                logprobs_B_T_V, teacher.top_ids_B_T_K, teacher.top_logprobs_B_T_K, mask_B_T
            )
        self.weight_sum += float(weights_B_T.sum())
        self.tokens_in_loss += int((weights_B_T > 0).sum())
        return weights_B_T

    def reduce(self, local_tokens: int, total_tokens: float) -> None:
        """After the step's last micro-batch: the weight sums over all ranks (a rank with no method active
        counts its tokens with weight 1, as its unweighted loss does)."""
        if not self.world.distributed:
            return
        local_weight = self.weight_sum if self.active else float(local_tokens)
        local_in_loss = self.tokens_in_loss if self.active else local_tokens
        any_active, weight_sum, in_loss, *sums = self.world.sum(
            [float(self.active), local_weight, local_in_loss, *self.evidence_sums, *self.gate_sums]
        )
        self.evidence_sums, self.gate_sums = sums[:3], sums[3:]
        self.active = any_active > 0
        self.total_tokens, self.weight_sum, self.tokens_in_loss = int(total_tokens), weight_sum, int(in_loss)

    def rescale_gradients(self, params) -> None:
        """Turn the accumulated gradient of Σ w ℓ / N into that of Σ w ℓ / Σ w (module docstring)."""
        if not self.active or self.weight_sum <= 0:
            return
        factor = self.total_tokens / self.weight_sum
        for p in params:
            if p.grad is not None:
                p.grad.mul_(factor)

    def loss_denominator(self) -> float:
        """What the logged loss (Σ w ℓ) is divided by: Σ w, or the token count without methods."""
        return self.weight_sum if self.active and self.weight_sum > 0 else max(1, self.total_tokens)

    def metrics(self) -> dict[str, float]:
        if not self.active:
            return {}
        out = {
            "select/token_fraction": self.tokens_in_loss / max(1, self.total_tokens),
            "select/tokens": self.tokens_in_loss,
        }
        if self.fire:
            out["select/rollouts_dropped"] = self.dropped_rollouts
            out["select/weight_mean"] = self.weight_sum / max(1, self.tokens_in_loss)
        if self.evidence:
            total, tokens, kept = self.evidence_sums
            out["select/evidence_mean"] = total / tokens if tokens else float("nan")
            out["select/evidence_kept"] = kept / tokens if tokens else float("nan")
        if self.gate != "off":
            confident, tokens = self.gate_sums
            out["select/cognizant"] = confident / tokens if tokens else float("nan")
        if self.cfg.ta_opd:
            out["select/teachability_mean"] = self.teachability_all
            out["select/teachability_chosen_mean"] = self.teachability_chosen
        return out


def teachability_pass(
    cfg, student: Student, rollouts: list[Rollout], scores: list[SequenceScores]
) -> list[Tensor]:
    """τ per completion token of every rollout, from a no-grad forward of the student (TA-OPD needs the
    whole step's scores before the first backward: the top fraction is taken over the step)."""

    def taus(mb: MicroBatch) -> list[Tensor]:
        teacher = teacher_tensors([scores[i] for i in mb.idx], mb.mask_B_T.shape[1])
        tau_B_T = teachability(
            mb.logprobs_B_T_V.float(),
            teacher.top_ids_B_T_K,
            teacher.top_logprobs_B_T_K,
            teacher.tail_logprob_B_T,
            mb.mask_B_T,
            cfg.ta_student_top_k,
        )
        return [tau_B_T[b, : len(rollouts[i].completion_ids)] for b, i in enumerate(mb.idx)]

    return no_grad_pass(student, rollouts, cfg.micro_batch_size, taus)
