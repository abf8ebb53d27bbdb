"""POST /v1/chunk-score and gRPC ChunkScore: a student's completion scored by a black-box teacher.

For each chunk [s, e) of the student's completion (opd_teacher.blackbox.chunks.pick_chunks) the teacher is asked,
through its chat API, to continue the student's prefix (tokens < s): N samples at the request's
temperature, and one greedy answer with top_logprobs. Each sample is compared with the student's chunk
(embedding cosine with all-MiniLM-L6-v2, normalised character edit similarity); k samples at or above the
cosine threshold give the smoothed reward (k + α·prior)/(N + α), as in logit-free on-policy distillation:
the student's chunk is good when the teacher, in its place, would say the same. The greedy answer verifies
the chunk speculatively: how many of its tokens the teacher would have written itself. With
`return_teacher_tokens` the greedy continuation comes back token by token with the API's top logprobs
(`continuation_tokens` long), for a trainer to distil the teacher's distributions at the student's prefix
(opd_student.signals.continuation_kd). `num_samples: 0` skips the samples: one call per chunk.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
from prometheus_client import Counter

from opd_client import schema
from opd_client.errors import InvalidRequest
from opd_teacher.blackbox.api_client import ApiChoice, ApiUsage, gather_or_cancel
from opd_teacher.blackbox.backend import BlackBoxBackend
from opd_teacher.blackbox.chunks import TeacherToken, pick_chunks, smoothed_reward, verify_chunk
from opd_teacher.blackbox.similarity import edit_similarity

API_CALLS = Counter("opd_api_requests_total", "Calls made to black-box teachers' APIs", ["model"])
API_TOKENS = Counter("opd_api_tokens_total", "Tokens billed by black-box teachers' APIs", ["model", "kind"])
API_RETRIES = Counter("opd_api_retries_total", "Retried calls to black-box teachers' APIs", ["model"])

MAX_CHUNKS = 64
MAX_CHUNK_TOKENS = 256
MAX_SAMPLES = 64


async def chunk_score(backend: BlackBoxBackend, req: schema.ChunkScoreRequest) -> schema.ChunkScoreResponse:
    """Score the request's chunks; API calls for all chunks run at once (bounded by the API's limit)."""
    validate_chunk_request(req, backend.info)
    pieces = req.completion
    spans = pick_chunks(len(pieces), req.num_chunks, req.chunk_tokens, req.entropies)
    messages = [m.model_dump() for m in req.messages]
    usage = ApiUsage()
    try:
        answers = await gather_or_cancel(
            *[_ask(backend, req, messages, pieces, s, e, usage) for s, e in spans]
        )
    finally:
        name = backend.info.name
        API_CALLS.labels(name).inc(usage.requests)
        API_RETRIES.labels(name).inc(usage.retries)
        API_TOKENS.labels(name, "prompt").inc(usage.prompt_tokens)
        API_TOKENS.labels(name, "completion").inc(usage.completion_tokens)
    chunk_texts = ["".join(pieces[s:e]) for s, e in spans]
    cosines = await asyncio.to_thread(_cosines, backend, chunk_texts, [samples for samples, _, _ in answers])
    chunks = [
        _chunk(req, pieces, span, text, samples, greedy, cut, cos)
        for span, text, (samples, greedy, cut), cos in zip(spans, chunk_texts, answers, cosines, strict=True)
    ]
    return schema.ChunkScoreResponse(
        model=backend.info.name,
        chunks=chunks,
        usage=schema.ApiUsage(
            requests=usage.requests,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            retries=usage.retries,
        ),
    )


def validate_chunk_request(req: schema.ChunkScoreRequest, info: schema.ModelInfo) -> None:
    """Limits the schema cannot know; each error names the field and the limit."""
    checks = [
        (bool(req.messages), "messages", "messages is empty; send at least 1 message"),
        (bool(req.completion), "completion", "completion is empty; send the student's tokens as strings"),
        (
            len(req.completion) <= info.max_tokens,
            "completion",
            f"completion has {len(req.completion)} tokens, above this teacher's max_tokens={info.max_tokens}",
        ),
        (
            req.entropies is None or len(req.entropies) == len(req.completion),
            "entropies",
            f"entropies has {len(req.entropies or [])} values for {len(req.completion)} completion tokens",
        ),
        (
            req.entropies is None or all(math.isfinite(x) for x in req.entropies),
            "entropies",
            "entropies must be finite numbers",
        ),
        (
            1 <= req.num_chunks <= MAX_CHUNKS,
            "num_chunks",
            f"num_chunks = {req.num_chunks} must be in [1, {MAX_CHUNKS}]",
        ),
        (
            1 <= req.chunk_tokens <= MAX_CHUNK_TOKENS,
            "chunk_tokens",
            f"chunk_tokens = {req.chunk_tokens} must be in [1, {MAX_CHUNK_TOKENS}]",
        ),
        (
            0 <= req.num_samples <= MAX_SAMPLES,
            "num_samples",
            f"num_samples = {req.num_samples} must be in [0, {MAX_SAMPLES}]",
        ),
        (
            req.continuation_tokens is None or 1 <= req.continuation_tokens <= MAX_CHUNK_TOKENS,
            "continuation_tokens",
            f"continuation_tokens = {req.continuation_tokens} must be in [1, {MAX_CHUNK_TOKENS}]",
        ),
        (0 <= req.temperature <= 2, "temperature", f"temperature = {req.temperature} must be in [0, 2]"),
        (
            -1 <= req.similarity_threshold <= 1,
            "similarity_threshold",
            f"similarity_threshold = {req.similarity_threshold} must be in [-1, 1]",
        ),
        (0 <= req.prior <= 1, "prior", f"prior = {req.prior} must be in [0, 1]"),
        (0 <= req.alpha <= 1000, "alpha", f"alpha = {req.alpha} must be in [0, 1000]"),
        (
            0 <= req.top_logprobs <= info.max_top_k,
            "top_logprobs",
            f"top_logprobs = {req.top_logprobs} must be in [0, {info.max_top_k}] (the API's limit)",
        ),
    ]
    for ok, field, message in checks:
        if not ok:
            raise InvalidRequest(message, field=field)


async def _ask(
    backend: BlackBoxBackend,
    req: schema.ChunkScoreRequest,
    messages: list[dict],
    pieces: list[str],
    start: int,
    end: int,
    usage: ApiUsage,
) -> tuple[list[str], ApiChoice, int]:
    """The teacher's N sampled continuations of the chunk's prefix (as text), its greedy answer, and the
    characters of that answer that repeat the prefix (cut before comparing)."""
    prefix = "".join(pieces[:start])
    asked, extra = backend.continuation(messages, prefix)
    # As many tokens as the student's chunk has: with the student's tokenizer the texts are of like
    # length; with another tokenizer roughly so. The greedy answer may go further (continuation_tokens).
    max_tokens = end - start
    greedy_tokens = max(max_tokens, req.continuation_tokens or 0)
    greedy_call = backend.api.complete(asked, 1, greedy_tokens, 0.0, usage, req.top_logprobs, extra)
    if req.num_samples == 0:
        sampled, greedy = [], await greedy_call
    else:
        sampled, greedy = await gather_or_cancel(
            backend.api.complete(asked, req.num_samples, max_tokens, float(req.temperature), usage, 0, extra),
            greedy_call,
        )
    samples = [backend.continuation_text(prefix, c.text)[0] for c in sampled]
    return samples, greedy[0], backend.continuation_text(prefix, greedy[0].text)[1]


def _cosines(
    backend: BlackBoxBackend, chunk_texts: list[str], samples_M_N: list[list[str]]
) -> list[np.ndarray]:
    if backend.embedder is None:
        raise RuntimeError("the black-box backend was not warmed up (no embedding model)")
    return [
        backend.embedder.cosine(text, samples) if samples else np.zeros(0)
        for text, samples in zip(chunk_texts, samples_M_N, strict=True)
    ]


def _chunk(
    req: schema.ChunkScoreRequest,
    pieces: list[str],
    span: tuple[int, int],
    text: str,
    samples: list[str],
    greedy: ApiChoice,
    greedy_cut: int,
    cos_N: np.ndarray,
) -> schema.ChunkScore:
    start, end = span
    edit_N = np.array([edit_similarity(text, s) for s in samples], dtype=np.float64)
    if not len(samples):  # num_samples 0: nothing to compare with, the mean/max of nothing is 0
        cos_N = edit_N = np.zeros(1)
    matches = int((cos_N >= req.similarity_threshold).sum())
    greedy_text = greedy.text[greedy_cut:]
    verification = verify_chunk(
        pieces[start:end],
        greedy_text,
        greedy.tokens,
        stopped=greedy.finish_reason == "stop",
        ends_completion=end == len(pieces),
        skip_chars=greedy_cut,
    )
    return schema.ChunkScore(
        start=start,
        end=end,
        text=text,
        similarity=float(cos_N.mean()),
        similarity_max=float(cos_N.max()),
        edit_similarity=float(edit_N.mean()),
        edit_similarity_max=float(edit_N.max()),
        matches=matches,
        reward=smoothed_reward(matches, len(samples), req.prior, req.alpha) if samples else req.prior,
        accepted_tokens=verification.accepted_tokens,
        token_logprobs=verification.token_logprobs,
        greedy=greedy_text,
        samples=samples if req.return_samples else None,
        teacher_tokens=continuation_tokens(greedy.tokens, greedy_cut) if req.return_teacher_tokens else None,
    )


def continuation_tokens(
    tokens: list[TeacherToken] | None, skip_chars: int
) -> list[schema.TeacherToken] | None:
    """The greedy continuation's tokens after the `skip_chars` characters that repeat the prefix (instruct
    mode), each with its top logprobs, most likely first. None when the API gave no logprobs, or when the cut
    falls inside a token (the tokens after it would not follow the student's prefix)."""
    if tokens is None:
        return None
    position = 0
    for i, token in enumerate(tokens):
        if position == skip_chars:
            return [_teacher_token(t) for t in tokens[i:]]
        if position > skip_chars:
            return None
        position += len(token.text)
    return [] if position == skip_chars else None


def _teacher_token(token: TeacherToken) -> schema.TeacherToken:
    ranked = sorted(token.alternatives.items(), key=lambda kv: -kv[1])
    return schema.TeacherToken(
        text=token.text,
        logprob=token.logprob,
        top_tokens=[t for t, _ in ranked],
        top_logprobs=[lp for _, lp in ranked],
    )
