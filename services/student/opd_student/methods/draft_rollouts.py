"""Draft-OPD (Lei et al. 2026, *Draft-OPD: On-Policy Distillation for Speculative Draft Models*, arXiv
2605.29343): the student is trained as the teacher's speculative-decoding draft. The paper: "uses
target-assisted rollout for stable continuations and replays drafting from the verification-exposed error
positions. This allows the drafter to learn from target feedback on both accepted and rejected proposals".

Our reading, for a draft that is a whole small LM sharing the teacher's tokenizer (the paper's drafters are
EAGLE-3 / DFlash heads on the target's features), with greedy drafting and greedy verification as in the
acceptance-length measurement (`opd bench draft`):

- target-assisted rollout: speculative decoding is lossless, so the sequence it produces is the teacher's
  own greedy answer S, whatever the draft proposes; we ask the service for it (its generation, KV-cached)
  instead of running draft-and-verify rounds. The contexts S[:t] are what a draft meets when it drafts for
  this teacher.
- verification-exposed errors: a greedy draft's proposal at t, whichever block t falls in, is its argmax
  given S[:t] (the tokens it drafted before t in the block were accepted, so they are S's); the verifier
  rejects it exactly where that argmax differs from S[t]. One teacher-forced forward of the student over S
  finds them all, and also the disagreements at the positions where the teacher adds its bonus token after
  a fully accepted block — not drafted with this block size, drafted with another; we count every
  disagreement as an error (tests/test_draft_opd.py checks both against draft-and-verify rounds).
- replay: from up to `draft_replays` error positions per sequence (a seeded draw), the student drafts
  `samples_per_prompt` fresh blocks of `draft_block` tokens (sampled at the rollout temperature): its own
  proposals at the states where it goes wrong, and what it does after them.

The training rollouts are S (every accepted context and every error position) and the replayed blocks. The
loss is the run's full-distribution loss (exact_reverse_kl, top-k or JSD forms), which depends on the
context and not on which token was written there, so the teacher's tokens in S are not trained as if the
student had sampled them (the sampled-token loss is refused); an error state appears both in S and as the
first position of its replays, so errors weigh more.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from opd_student.config import TrainConfig
from opd_student.prompts import Prompt
from opd_student.rollout_factory import RolloutFactory
from opd_student.rollouts import Rollout, pack, row_seed
from opd_student.student_model import Student
from opd_student.teacher_link import TeacherLink

_REPLAY_STREAM = 12  # row_seed's second key for the replays (0: the student's plain samples)


def error_positions(student_argmax_T: list[int], sequence_T: list[int]) -> list[int]:
    """Where a greedy draft is rejected along `sequence`: its argmax given the prefix differs from the token."""
    return [t for t, (a, s) in enumerate(zip(student_argmax_T, sequence_T, strict=True)) if a != s]


def at(view: Rollout, sequence: list[int], prefix_len: int, completion: list[int]) -> Rollout:
    """The rollout of `completion` after the prompt and the first `prefix_len` tokens of `sequence`."""
    prefix = sequence[:prefix_len]
    privileged = view.teacher_prefix_ids
    return dataclasses.replace(
        view,
        prompt_ids=view.prompt_ids + prefix,
        completion_ids=completion,
        teacher_prefix_ids=privileged + prefix if privileged is not None else None,
        loss_spans=None,  # character spans of the prompt's answer, not of a block
    )


class DraftRollouts:
    def __init__(
        self, cfg: TrainConfig, student: Student, factory: RolloutFactory, link: TeacherLink
    ) -> None:
        self.cfg, self.student, self.factory, self.link = cfg, student, factory, link

    def rollouts(
        self, prompts: list[Prompt], prompt_ids: list[list[int]], index: int, horizon: int
    ) -> tuple[list[Rollout], dict[str, Any]]:
        """The step's training rollouts: each prompt's target-assisted sequence, then the replayed blocks."""
        views = [self.factory.group(p, ids, [[]])[0] for p, ids in zip(prompts, prompt_ids, strict=True)]
        sequences = [self._teacher_answer(v, horizon) for v in views]
        made = [dataclasses.replace(v, completion_ids=s) for v, s in zip(views, sequences, strict=True)]
        with torch.no_grad():
            argmax_B_T = self.student.logprobs(pack(made, self.student.pad_token_id)).argmax(-1).tolist()
        errors = [error_positions(a[: len(s)], s) for a, s in zip(argmax_B_T, sequences, strict=True)]
        replays = self._replays(views, sequences, errors, index)
        tokens = sum(len(s) for s in sequences)
        n_errors = sum(len(e) for e in errors)
        metrics = {
            # the share of the teacher's tokens the student's greedy draft would have proposed
            "draft/argmax_match": 1 - n_errors / max(1, tokens),
            "draft/errors": n_errors,
            "draft/replays": len(replays),
            "teacher/sampling_positions": tokens,
        }
        return made + replays, metrics

    def _teacher_answer(self, view: Rollout, horizon: int) -> list[int]:
        """The teacher's greedy answer to its view of the prompt (privileged, if any), at most horizon tokens."""
        prompt = view.teacher_prefix_ids if view.teacher_prefix_ids is not None else view.prompt_ids
        answer = self.link.client.generate_tokens(
            prompt, max_tokens=horizon, temperature=0.0, model=view.teacher
        )
        return answer[:horizon]

    def _replays(
        self, views: list[Rollout], sequences: list[list[int]], errors: list[list[int]], index: int
    ) -> list[Rollout]:
        """G fresh blocks from the contexts of (up to draft_replays of) each sequence's error positions."""
        cfg, G, eos = self.cfg, self.cfg.samples_per_prompt, self.student.eos_token_id
        picks: list[tuple[int, int]] = []  # (prompt, error position)
        for p, errs in enumerate(errors):
            rng = np.random.default_rng(row_seed(cfg.seed, _REPLAY_STREAM, index, p))
            picks += [(p, errs[i]) for i in sorted(rng.permutation(len(errs))[: cfg.draft_replays])]
        contexts = [views[p].prompt_ids + sequences[p][:e] for p, e in picks]
        seeds = [row_seed(cfg.seed, _REPLAY_STREAM, index, p, e, g) for p, e in picks for g in range(G)]
        # one generate call on every rank (collective under FSDP2), with a stand-in row where none is picked
        blocks_P_G = self.student.sample(
            contexts or [[eos]], G if picks else 1, cfg.draft_block, cfg.temperature, seeds or [0]
        )
        if not picks:
            return []
        return [
            at(views[p], sequences[p], e, block)
            for (p, e), blocks in zip(picks, blocks_P_G, strict=True)
            for block in blocks
        ]
