"""White-box teachers' exact full-vocabulary signal: the teacher's final hidden states (`return_hidden`)
and its output head give its whole distribution p over V ids; the loss is a divergence between p and the
student's q over all of them (exact_losses.py), not a sample or a top-k of it.

- exact_reverse_kl  KL(q‖p), the quantity on-policy distillation minimises, with its exact gradient
- exact_forward_kl  KL(p‖q)
- exact_jsd         GKD's JSD(β)

The request also asks for the teacher's top-k (cfg.top_k), so the methods' token weights (TA-OPD, FiRe)
and the sampled-KL metrics work as with top-k scores. Each teacher (routing, several --teacher-rules
names) is scored against its own head.
"""

from __future__ import annotations

import torch

from opd_client.schema import ModelInfo
from opd_student.exact_losses import Divergence, exact_divergence, rows_by_teacher
from opd_student.rollouts import Rollout, TeacherTensors
from opd_student.signals.token_scores import TokenRequest, TokenScoreSignal
from opd_student.teacher_heads import TeacherHeads, offers_hidden_states

KINDS: dict[str, Divergence] = {
    "exact_reverse_kl": "reverse_kl",
    "exact_forward_kl": "forward_kl",
    "exact_jsd": "jsd",
}


class ExactFullVocab(TokenScoreSignal):
    progress = ("kl", "kl/sampled_reverse")

    def check_teacher(self, info: ModelInfo, url: str) -> None:
        super().check_teacher(info, url)
        if not offers_hidden_states(info):
            raise SystemExit(
                f"error: teacher {info.name!r} at {url} serves no hidden states and head (its logits are not "
                f"h · Wᵀ, see its log): --loss {self.cfg.loss} needs them; use --loss reverse_kl or jsd"
            )

    def request(self, rollouts: list[Rollout]) -> TokenRequest:
        hidden_dtype = None if self.cfg.hidden_dtype == "auto" else self.cfg.hidden_dtype
        pending = self.link.submit(
            rollouts, self.cfg.top_k, None, return_hidden=True, hidden_dtype=hidden_dtype
        )
        return TokenRequest(pending, None, self.evidence_request(rollouts))

    def loss(self, logprobs_B_T_V, q_tok_B_T, teacher, mask_B_T, score_ids_B_T_K, teachers_B):
        return exact_loss(
            logprobs_B_T_V,
            teacher,
            mask_B_T,
            teachers_B,
            self.heads,
            KINDS[self.cfg.loss],
            beta=self.cfg.jsd_beta,
            temperature=self.cfg.distill_temperature,
        )


def exact_loss(
    logprobs_B_T_V: torch.Tensor,
    teacher: TeacherTensors,
    mask_B_T: torch.Tensor,
    teachers_B: list[str | None],
    heads: TeacherHeads,
    kind: Divergence,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token exact divergence [B, T]; rows of different teachers use their own heads."""
    if teacher.hidden_B_T_D is None:
        raise ValueError("the teacher's answer holds no hidden states (return_hidden)")
    groups = rows_by_teacher(teachers_B)
    if len(groups) == 1:
        return exact_divergence(
            logprobs_B_T_V, teacher.hidden_B_T_D, heads(groups[0][0]), mask_B_T, kind, beta, temperature
        )
    out_B_T = torch.zeros(mask_B_T.shape, dtype=logprobs_B_T_V.dtype, device=logprobs_B_T_V.device)
    for name, rows in groups:
        part = exact_divergence(
            logprobs_B_T_V[rows],
            teacher.hidden_B_T_D[rows],
            heads(name),
            mask_B_T[rows],
            kind,
            beta,
            temperature,
        )
        out_B_T = out_B_T.index_put((rows,), part)
    return out_B_T
