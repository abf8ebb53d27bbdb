"""Held-out KL to a teacher with another tokenizer, per byte of completion text.

Per-token KLs do not compare across tokenizers (a token is a different amount of text on each side), but
text does. The student answers each held-out prompt (the same seeded samples as opd_student.evaluation);
the teacher scores the same text with its own tokens (POST /v1/score-text, its end-of-turn token when the
student ended with EOS). Per rollout, log q(text) − log p(text) = Σ log q over the student's tokens − Σ
log p over the teacher's; summed over the rollouts and divided by the completions' UTF-8 bytes it is the
sampled reverse KL per byte, `eval/reverse_kl_per_byte` — the same key and definition evaluation.py
reports for a same-tokenizer teacher, so runs of both kinds compare. (Each side scores its own
tokenization of the text, not the sum over every tokenization that spells it; so does every per-token
measure here.) `eval/reverse_kl` is the same sum per student token.
"""

from __future__ import annotations

import math

import torch

from opd_client.schema import TextSequenceScores
from opd_client.token_bytes import vocab_bytes
from opd_student.distributed import SINGLE, World
from opd_student.evaluation import eval_share, heldout_rollouts
from opd_student.prompts import Prompt
from opd_student.rollout_factory import RolloutFactory
from opd_student.rollouts import pack, student_logprobs, unwrap
from opd_student.teacher_link import TeacherLink
from opd_student.text_scores import student_text, text_request


def evaluate_by_text(
    model,
    tokenizer,
    link: TeacherLink,
    prompts: list[Prompt],
    factory: RolloutFactory,
    max_new_tokens: int,
    seed: int = 1234,
    batch_size: int = 8,
    autocast: bool = False,
    world: World = SINGLE,
) -> dict[str, float]:
    """Sums over all ranks when several trainer processes share the prompts; every rank gets the result."""
    vocab = vocab_bytes(tokenizer)
    eos = int(tokenizer.eos_token_id)
    rev_sum = tokens = num_bytes = teacher_tokens = answers = 0.0
    device_type = unwrap(model).device.type
    for rollouts in heldout_rollouts(
        model, tokenizer, factory, prompts, max_new_tokens, seed, batch_size, world
    ):
        texts = [student_text(r, vocab, eos) for r in rollouts]
        requests = [text_request(r, text, top_k=0) for r, text in zip(rollouts, texts, strict=True)]
        scored: list[TextSequenceScores] = link.collect(link.submit_text(requests))
        batch = pack(rollouts, tokenizer.pad_token_id)
        with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            logprobs_B_T_V = student_logprobs(model, batch)
        q_tok_B_T = logprobs_B_T_V.float().cpu().gather(-1, batch.targets_B_T[..., None])[..., 0]
        log_q = (q_tok_B_T * batch.mask_B_T).sum().item()
        log_p = sum(float(sum(a.token_logprobs)) for a in scored)
        rev_sum += log_q - log_p
        tokens += batch.num_tokens
        num_bytes += sum(a.completion_bytes for a in scored)
        teacher_tokens += sum(len(a.token_ids) for a in scored)
        answers += len(scored)
    rev_sum, tokens, num_bytes, teacher_tokens, answers = world.sum(
        [rev_sum, tokens, num_bytes, teacher_tokens, answers]
    )
    return {
        "eval/reverse_kl": rev_sum / tokens,
        "eval/reverse_kl_per_byte": rev_sum / num_bytes if num_bytes else math.nan,  # every answer empty
        # the KL of a whole answer, log q(answer) − log p(answer): also meaningful when answers are empty
        "eval/reverse_kl_per_answer": rev_sum / max(1.0, answers),
        "eval/tokens": int(tokens),
        "eval/bytes": int(num_bytes),
        "eval/teacher_tokens": int(teacher_tokens),
        "eval/prompts": len(eval_share(prompts, world)[0]),
    }


def text_eval_summary(result: dict) -> str:
    return (
        f"sampled reverse KL {result['eval/reverse_kl_per_byte']:.4f} nats/byte over {result['eval/bytes']} "
        f"bytes ({result['eval/reverse_kl']:.4f} nats/student token, {result['eval/reverse_kl_per_answer']:.3f} "
        "nats/answer; a teacher with another tokenizer, by text)"
    )
