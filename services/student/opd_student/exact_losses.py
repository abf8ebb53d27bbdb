"""Divergences over the teacher's full vocabulary, from its hidden states and its output head.

The teacher service returns each completion position's final hidden state h [D] (`return_hidden`); with
its head (opd_client.head) the trainer computes the teacher's exact log p over all V ids. Three losses,
p = teacher, q = student, both at `temperature` (log_softmax(logits / τ); no τ² factor):

    reverse KL   Σ_v q_v (log q_v − log p_v)            what on-policy distillation minimises
    forward KL   Σ_v p_v (log p_v − log q_v)
    JSD(β)       β KL(p‖m) + (1 − β) KL(q‖m),  m = β p + (1 − β) q   (GKD; losses.generalized_jsd's β)

The gradient flows through q only. The teacher's [N, V] exists for one block of positions at a time and is
recomputed in the backward pass (torch.utils.checkpoint), so a batch costs one [block, V] of teacher
memory beyond the student's own [B, T, V] log-probabilities, never a [B, T, V] of the teacher.

Vocabularies: when the head has as many rows as the student's logits, both are compared over all of them.
Otherwise (one model pads its vocabulary further than the other) both are cut to the tokenizer's ids
(head.tokenizer_vocab_size) and renormalised: padding ids are never produced by the tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from opd_client.head import TeacherHead, logits_from_hidden

Divergence = Literal["reverse_kl", "forward_kl", "jsd"]

# Elements of one [positions, V] block of teacher (or student) log-probabilities: 2^22 fp32 = 16 MiB, so a
# block's handful of temporaries stays well under the head's size at any vocabulary (85 positions at V = 49k,
# 27 at 152k).
BLOCK_ELEMENTS = 1 << 22


def block_positions_for(vocab_size: int) -> int:
    """Positions whose teacher distribution is materialised at once."""
    return max(1, BLOCK_ELEMENTS // vocab_size)


def exact_divergence(
    student_logprobs_B_T_V: Tensor,
    teacher_hidden_B_T_D: Tensor,
    head: TeacherHead,
    mask_B_T: Tensor,
    kind: Divergence = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    block_positions: int | None = None,
) -> Tensor:
    """Per-token divergence [B, T] (0 at padding) between the student's log q [B, T, V] and the teacher
    distribution of hidden states [B, T, D] under `head`, computed block by block over positions."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    blocks = _Blocks(
        student_logprobs_B_T_V, teacher_hidden_B_T_D, head, mask_B_T, temperature, block_positions
    )
    parts = []
    for lq_n_V, h_n_D in blocks:
        if h_n_D is None:
            parts.append(lq_n_V.new_zeros(lq_n_V.shape[0]))
            continue

        def block(lq: Tensor, h: Tensor = h_n_D) -> Tensor:
            lq, lp = blocks.logprobs(lq, h)
            return _divergence(lq, lp, kind, beta)

        if lq_n_V.requires_grad and torch.is_grad_enabled():
            parts.append(checkpoint(block, lq_n_V, use_reentrant=False))
        else:
            parts.append(block(lq_n_V))
    return blocks.per_token(parts)


@torch.no_grad()
def exact_kls(
    student_logprobs_B_T_V: Tensor,
    teacher_hidden_B_T_D: Tensor,
    head: TeacherHead,
    mask_B_T: Tensor,
    temperature: float = 1.0,
    block_positions: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Reverse KL(q‖p) and forward KL(p‖q) per token, [B, T] each, from one teacher log-softmax per block
    (evaluation: no gradient)."""
    blocks = _Blocks(
        student_logprobs_B_T_V, teacher_hidden_B_T_D, head, mask_B_T, temperature, block_positions
    )
    reverse, forward = [], []
    for lq_n_V, h_n_D in blocks:
        if h_n_D is None:
            reverse.append(lq_n_V.new_zeros(lq_n_V.shape[0]))
            forward.append(reverse[-1])
            continue
        lq, lp = blocks.logprobs(lq_n_V, h_n_D)
        reverse.append(_kl(lq, lp))
        forward.append(_kl(lp, lq))
    return blocks.per_token(reverse), blocks.per_token(forward)


def rows_by_teacher(teachers_B: list[str | None]) -> list[tuple[str | None, Tensor | None]]:
    """(teacher name, its rows) for each teacher in a batch; rows None when one teacher has them all."""
    names = list(dict.fromkeys(teachers_B))
    if len(names) == 1:
        return [(names[0], None)]
    return [(name, torch.tensor([b for b, n in enumerate(teachers_B) if n == name])) for name in names]


class _Blocks:
    """A batch flattened to N = B·T positions and cut into blocks: (student log q [n, V], teacher hidden
    [n, D] on the head's device, or None for a block of padding only)."""

    def __init__(
        self,
        student_logprobs_B_T_V: Tensor,
        teacher_hidden_B_T_D: Tensor,
        head: TeacherHead,
        mask_B_T: Tensor,
        temperature: float,
        block_positions: int | None,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        B, T, V = student_logprobs_B_T_V.shape
        self.shape, self.head, self.temperature = (B, T), head, temperature
        self.vocab = shared_vocab(V, head)
        self.lq_N_V = student_logprobs_B_T_V.reshape(B * T, V)
        # [..., :D]: a batch of several teachers is padded to the largest hidden size
        self.h_N_D = teacher_hidden_B_T_D[..., : head.hidden_size].reshape(B * T, head.hidden_size)
        self.valid_N = mask_B_T.reshape(B * T).to(student_logprobs_B_T_V.device) > 0
        self.n = block_positions or block_positions_for(max(V, head.vocab_size))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        # torch.split: one backward node concatenates the blocks' gradients (slicing would make one
        # full-size gradient per block).
        for lq_n_V, h_n_D, valid_n in zip(
            torch.split(self.lq_N_V, self.n),
            torch.split(self.h_N_D, self.n),
            torch.split(self.valid_N, self.n),
            strict=True,
        ):
            yield lq_n_V, (h_n_D.to(self.head.weight_V_D.device) if bool(valid_n.any()) else None)

    def logprobs(self, lq_n_V: Tensor, h_n_D: Tensor) -> tuple[Tensor, Tensor]:
        """Student and teacher log-probabilities of one block, at the temperature, over the shared ids."""
        lq = _student_logprobs(lq_n_V, self.vocab, self.temperature)
        lp = teacher_logprobs(h_n_D, self.head, self.vocab, self.temperature).to(lq.device, lq.dtype)
        return lq, lp

    def per_token(self, parts: list[Tensor]) -> Tensor:
        per_token_N = torch.cat(parts)
        return torch.where(self.valid_N, per_token_N, torch.zeros_like(per_token_N)).reshape(self.shape)


def shared_vocab(student_vocab: int, head: TeacherHead) -> int | None:
    """None: compare over all V entries; else the number of leading ids both distributions are cut to."""
    if head.vocab_size == student_vocab:
        return None
    n = head.tokenizer_vocab_size
    if n is None or n > min(student_vocab, head.vocab_size):
        raise ValueError(
            f"the student's logits have {student_vocab} entries and teacher {head.model!r}'s head "
            f"{head.vocab_size} (tokenizer: {n}): the vocabularies cannot be lined up"
        )
    return n


@torch.no_grad()
def teacher_logprobs(hidden_N_D: Tensor, head: TeacherHead, vocab: int | None, temperature: float) -> Tensor:
    """The teacher's fp32 log p [N, V] (or [N, vocab]) from hidden states."""
    logits_N_V = logits_from_hidden(hidden_N_D, head, temperature)
    if vocab is not None:
        logits_N_V = logits_N_V[:, :vocab]
    return torch.log_softmax(logits_N_V, dim=-1)


def _student_logprobs(lq_N_V: Tensor, vocab: int | None, temperature: float) -> Tensor:
    if lq_N_V.dtype != torch.float64:  # float64 stays (exact comparisons of code paths), the rest is fp32
        lq_N_V = lq_N_V.float()
    if vocab is not None:
        lq_N_V = lq_N_V[:, :vocab]
    if temperature != 1.0 or vocab is not None:
        # log_softmax(log q / τ) = log_softmax(logits / τ): log q differs from the logits by a constant
        lq_N_V = torch.log_softmax(lq_N_V / temperature, dim=-1)
    return lq_N_V


def _kl(log_a_N_V: Tensor, log_b_N_V: Tensor) -> Tensor:
    """Σ_v a (log a − log b); an id with a = 0 adds 0 (xlogy semantics, no 0 · −inf)."""
    a_N_V = log_a_N_V.exp()
    return torch.where(a_N_V > 0, a_N_V * (log_a_N_V - log_b_N_V), 0.0).sum(-1)


def _divergence(lq_N_V: Tensor, lp_N_V: Tensor, kind: Divergence, beta: float) -> Tensor:
    if kind == "reverse_kl":
        return _kl(lq_N_V, lp_N_V)
    if kind == "forward_kl":
        return _kl(lp_N_V, lq_N_V)
    if kind != "jsd":
        raise ValueError(f"kind must be reverse_kl, forward_kl or jsd; got {kind!r}")
    if beta == 0.0:
        return _kl(lp_N_V, lq_N_V)
    if beta == 1.0:
        return _kl(lq_N_V, lp_N_V)
    lm_N_V = torch.logaddexp(lp_N_V + math.log(beta), lq_N_V + math.log1p(-beta))
    return beta * _kl(lp_N_V, lm_N_V) + (1.0 - beta) * _kl(lq_N_V, lm_N_V)
