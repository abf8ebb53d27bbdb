"""The black-box teacher's own distributions, distilled at the student's prefixes (`--chunk-kd-coef`).

Where the API returns top logprobs (OpenAI-style, at most 20 per token), the chunk scorer's greedy
continuation of each chunk's prefix comes back token by token with the teacher's alternatives
(`return_teacher_tokens`, `continuation_tokens` long). The student is teacher-forced on its own prompt, its
own prefix and the teacher's continuation, and at each continuation position the loss is the forward KL on
the teacher's top-k plus a tail bucket,

    KL_t = Σ_k p_k (log p_k − log q_k) + p_tail (log p_tail − log q_tail)      (losses.ragged_topk_forward_kl)

— the white-box top-k forward KL (GKD's supervised KD term, Agarwal et al. 2024, arXiv 2306.13649) at
states that start on the student's own rollout: the first continuation position is exactly a state the
student visited, the later ones are a few teacher tokens off it. Sequence-level KD (Kim & Rush 2016,
arXiv 1606.07947) restarted from on-policy prefixes: our reading of the issue's "top-k forward KL at the
student's own states"; no paper we know does exactly this through an API.

The API speaks text, not ids: a teacher token maps to the student id whose decoded text it is (always so for
a teacher with the student's tokenizer; for another tokenizer where the strings agree). The continuation is
cut before the first chosen token that does not map; alternatives that do not map join the tail bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_client.schema import ChunkScoreResponse, TeacherToken
from opd_student import losses
from opd_student.microbatch import MicroBatch, no_grad_pass
from opd_student.rollouts import Rollout
from opd_student.student_model import Student


class TokenTable:
    """Text → student id, for the token strings an API reports.

    Each id's own decoded text (special tokens by their literal text); texts two ids share and pieces of a
    multi-byte character (decoded as U+FFFD) are left out. llama.cpp reports a special token such as the
    end-of-turn as "": that maps to the student's EOS id.
    """

    def __init__(self, tokenizer, eos_token_id: int) -> None:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False)
        seen: dict[str, int] = {}
        shared: set[str] = set()
        for i, text in enumerate(texts):
            if "\ufffd" in text or not text:
                continue
            if text in seen:
                shared.add(text)
            seen.setdefault(text, i)
        self.ids = {t: i for t, i in seen.items() if t not in shared}
        self.ids[""] = eos_token_id

    def get(self, text: str) -> int | None:
        return self.ids.get(text)


@dataclass
class KdSequence:
    """A rollout's prefix and the teacher's continuation of it, as a training sequence."""

    rollout: Rollout  # prompt_ids = the rollout's prompt + its first `start` completion tokens
    top_ids_T_K: list[list[int]]  # per continuation position, the alternatives that map to student ids
    top_logprobs_T_K: list[list[float]]


def kd_sequences(
    rollouts: list[Rollout], responses: list[ChunkScoreResponse], table: TokenTable
) -> list[KdSequence]:
    """One sequence per chunk whose continuation has at least one mapped token."""
    out = []
    for rollout, response in zip(rollouts, responses, strict=True):
        for chunk in response.chunks:
            seq = _continuation(rollout, chunk.start, chunk.teacher_tokens or [], table)
            if seq is not None:
                out.append(seq)
    return out


def _continuation(
    rollout: Rollout, start: int, tokens: list[TeacherToken], table: TokenTable
) -> KdSequence | None:
    ids, top_ids, top_lps = [], [], []
    for token in tokens:
        chosen = table.get(token.text)
        if chosen is None:
            break  # the student cannot follow the teacher past a token it cannot name
        mapped = [(table.get(t), lp) for t, lp in zip(token.top_tokens, token.top_logprobs, strict=True)]
        kept: dict[int, float] = {}
        for i, lp in mapped:
            if i is not None:
                kept.setdefault(i, lp)
        ids.append(chosen)
        top_ids.append(list(kept))
        top_lps.append(list(kept.values()))
    if not ids:
        return None
    prefix = Rollout(
        prompt_ids=rollout.prompt_ids + rollout.completion_ids[:start],
        completion_ids=ids,
        teacher=rollout.teacher,
        prompt_id=rollout.prompt_id,
    )
    return KdSequence(prefix, top_ids, top_lps)


def padding_sequence(rollout: Rollout) -> KdSequence:
    """A one-token sequence with no teacher alternatives (no loss): ranks with fewer continuations run as
    many micro-batches as the others (gradient synchronisation needs the same count everywhere)."""
    return KdSequence(
        Rollout(prompt_ids=rollout.prompt_ids, completion_ids=rollout.completion_ids[:1]), [[]], [[]]
    )


def kd_tensors(
    seqs_B: list[KdSequence | None], horizon: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_B_T_K, logprobs_B_T_K, present_B_T_K) padded to the micro-batch; rows of None (rollouts, not
    continuations) and padding have nothing present."""
    K = max([1] + [len(row) for s in seqs_B if s is not None for row in s.top_ids_T_K])
    ids = torch.zeros((len(seqs_B), horizon, K), dtype=torch.long)
    lps = torch.zeros((len(seqs_B), horizon, K))
    present = torch.zeros((len(seqs_B), horizon, K), dtype=torch.bool)
    for b, s in enumerate(seqs_B):
        if s is None:
            continue
        for t, (row_ids, row_lps) in enumerate(zip(s.top_ids_T_K, s.top_logprobs_T_K, strict=True)):
            n = len(row_ids)
            ids[b, t, :n] = torch.tensor(row_ids, dtype=torch.long)
            lps[b, t, :n] = torch.tensor(row_lps)
            present[b, t, :n] = True
    return ids, lps, present


def heldout_kd(
    student: Student, seqs: list[KdSequence], fallback: Rollout, micro_batch_size: int
) -> tuple[float, int]:
    """(Σ KL, positions) of the student's top-k forward KL to the teacher over these continuations (this
    rank's, no grad): the held-out measure of what the KD term trains, needing no white-box copy. Ranks
    pad to the same number of sequences (a sharded forward needs every rank)."""
    positions = sum(len(s.top_ids_T_K) for s in seqs)
    width = int(student.world.max(len(seqs)))
    seqs = seqs + [padding_sequence(fallback)] * (width - len(seqs))

    def per_row(mb: MicroBatch) -> list[float]:
        ids_B_T_K, lps_B_T_K, present_B_T_K = kd_tensors([seqs[i] for i in mb.idx], mb.mask_B_T.shape[1])
        kl_B_T = losses.ragged_topk_forward_kl(
            mb.logprobs_B_T_V, ids_B_T_K, lps_B_T_K, present_B_T_K, mb.mask_B_T
        )
        return kl_B_T.sum(-1).tolist()

    sums = no_grad_pass(student, [s.rollout for s in seqs], micro_batch_size, per_row) if seqs else []
    return float(sum(sums)), positions
