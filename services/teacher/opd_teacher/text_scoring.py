"""Scoring by text (POST /v1/score-text, gRPC ScoreText): for callers whose tokenizer is not the teacher's.

The teacher renders the prompt (chat messages with its own chat template, or raw text), tokenizes the
completion its own way, and scores those tokens through the engine's ordinary score path: the same
batcher, limits and errors as /v1/score (an error's field names the text request's sequence). Per
teacher token the answer gives its logprob, its [start, end) byte span in the completion's UTF-8
(opd_client.token_bytes: the spans tile the text) and, with top_k, its top-k as strings, so a trainer
can align the teacher's tokens with its own by position in the text (cross-tokenizer distillation,
docs/methods.md).
"""

from __future__ import annotations

import asyncio

from opd_client import schema
from opd_client.errors import InvalidRequest, OpdError
from opd_client.token_bytes import text_byte_spans, vocab_bytes
from opd_teacher.engine import TeacherEngine

# Stands in for the assistant's answer when finding the text that closes a turn in a chat template.
_MARK = "\u2063opd-end-of-turn\u2063"


async def score_text(
    engine: TeacherEngine, req: schema.ScoreTextRequest, deadline: float | None = None
) -> schema.ScoreTextResponse:
    backend = engine.backend(req.model)
    info = backend.info
    tokenizer = getattr(backend, "tokenizer", None)
    if info.black_box or tokenizer is None:
        raise InvalidRequest(
            f"teacher {info.name!r} is black-box: it has no logprobs of given text; score it with POST "
            "/v1/chunk-score",
            field="model",
        )
    if not req.sequences:
        raise InvalidRequest("sequences is empty; send at least 1 sequence", field="sequences")
    if not 0 <= req.top_k <= info.max_top_k:
        raise InvalidRequest(
            f"top_k = {req.top_k} must be in [0, {info.max_top_k}] (max_top_k of model {info.name!r}; 0: no "
            "top-k)",
            field="top_k",
        )
    vocab = await asyncio.to_thread(vocab_bytes, tokenizer)  # built once per tokenizer (~1 s at 262k)
    end_id = (
        _end_of_turn_id(tokenizer, vocab.special_ids)
        if any(s.completion_ends for s in req.sequences)
        else None
    )
    prepared = [_prepare(i, seq, backend, tokenizer, end_id) for i, seq in enumerate(req.sequences)]
    score_req = schema.ScoreRequest(
        model=info.name,
        sequences=[
            schema.Sequence(token_ids=prompt + ids, prompt_len=len(prompt)) for prompt, ids, _ in prepared
        ],
        top_k=max(1, req.top_k),  # /v1/score computes at least the top-1; not sent with top_k = 0
        temperature=req.temperature,
    )
    try:
        result = await engine.score(score_req, deadline)
    except OpdError as e:  # the token request's field, as the text request names it
        field = e.field.split(".")[0] if e.field and e.field.startswith("sequences[") else e.field
        raise type(e)(e.message, field=field, retry_after=e.retry_after) from e
    out = []
    for seq, (prompt, ids, spans), scores in zip(req.sequences, prepared, result.sequences, strict=True):
        assert scores.token_logprobs_T is not None and scores.top_ids_T_K is not None, "top_k >= 1"
        top = req.top_k > 0
        out.append(
            schema.TextSequenceScores(
                token_ids=ids,
                tokens=vocab.text_of(ids),
                token_logprobs=scores.token_logprobs_T.tolist(),
                byte_spans=[list(span) for span in spans],
                completion_bytes=len(seq.completion.encode()),
                prompt_tokens=len(prompt),
                top_tokens=[vocab.text_of(row) for row in scores.top_ids_T_K.tolist()] if top else None,
                top_logprobs=scores.top_logprobs_T_K.tolist()
                if top and scores.top_logprobs_T_K is not None
                else None,
                tail_logprobs=scores.tail_logprob_T.tolist()
                if top and scores.tail_logprob_T is not None
                else None,
            )
        )
    usage = schema.Usage(scored_tokens=result.scored_tokens, forward_tokens=result.forward_tokens)
    return schema.ScoreTextResponse(model=info.name, sequences=out, usage=usage)


def _prepare(
    i: int, seq: schema.TextSequence, backend, tokenizer, end_id: int | None
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """(prompt ids, completion ids, their byte spans) of one text sequence."""
    where = f"sequences[{i}]"
    if (seq.messages is None) == (seq.prompt is None):
        raise InvalidRequest(f"{where}: send exactly one of messages and prompt", field=f"{where}.messages")
    if seq.messages is not None:
        if not seq.messages:
            raise InvalidRequest(
                f"{where}.messages is empty; send at least 1 message", field=f"{where}.messages"
            )
        try:
            text = backend.render_chat([m.model_dump() for m in seq.messages], True)
        except Exception as e:  # noqa: BLE001 - no template, or one that refuses these turns (Jinja raises)
            raise InvalidRequest(
                f"{where}.messages: the teacher's chat template cannot render them: {e}",
                field=f"{where}.messages",
            ) from e
        prompt = backend.tokenize_text(text, add_special_tokens=False)  # the template holds BOS if any
    else:
        assert seq.prompt is not None
        prompt = backend.tokenize_text(seq.prompt, add_special_tokens=True)
    ids, spans = text_byte_spans(tokenizer, seq.completion)
    if seq.completion_ends:
        if end_id is None:
            raise InvalidRequest(
                f"{where}.completion_ends: teacher has no end-of-turn or EOS token",
                field=f"{where}.completion_ends",
            )
        end = len(seq.completion.encode())
        ids, spans = [*ids, end_id], [*spans, (end, end)]
    if not ids:
        raise InvalidRequest(
            f"{where}.completion is empty: it needs at least 1 token to score (or completion_ends = true)",
            field=f"{where}.completion",
        )
    return prompt, ids, spans


def _end_of_turn_id(tokenizer, special_ids: frozenset[int]) -> int | None:
    """The special token the teacher's chat template closes an assistant turn with (ChatML's <|im_end|>,
    Gemma's <end_of_turn>), else its EOS."""
    if getattr(tokenizer, "chat_template", None):
        turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}]
        try:
            text = tokenizer.apply_chat_template(turns, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that refuses this chat: fall back to EOS
            text = ""
        if _MARK in text:
            after = text[text.rindex(_MARK) + len(_MARK) :]
            for token_id in tokenizer(after, add_special_tokens=False)["input_ids"]:
                if token_id in special_ids:
                    return int(token_id)
    eos = tokenizer.eos_token_id
    return int(eos) if isinstance(eos, int) else None
