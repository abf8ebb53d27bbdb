"""OpenAI-/vLLM-compatible endpoints, so external trainers and evaluators need only a URL change.

- POST /v1/completions: OpenAI legacy completions + vLLM's extensions (token-id prompts, prompt_logprobs, ...)
- POST /v1/chat/completions: messages rendered with the teacher's chat template, then sampled
- GET /health, /v2/health/live, /v2/health/ready: the health checks vLLM, TRL and KServe v2 clients call

Prompt scoring (echo with logprobs, prompt_logprobs) goes through engine.score, the same batcher and forward
as /v1/score, so its logprobs are the ones /v1/score gives for the same tokens. Generation runs on the same
forward thread (engine.generate), one prompt at a time, one decode step at a time between score batches, and
at most --max-generation-tokens per sample.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from opd_client import openai_schema as oai
from opd_client import schema
from opd_client.errors import InvalidRequest, TooManyTokens
from opd_teacher.backends.generate import Sample, SamplingParams
from opd_teacher.engine import TeacherEngine
from opd_teacher.http import openai_params as params
from opd_teacher.http import openai_shape as shape
from opd_teacher.http.openai_params import Prompt

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schema.ErrorBody} for status in (400, 401, 404, 413, 422, 429, 503)
}


def openai_router(engine: TeacherEngine, until_disconnect, deadline_from) -> APIRouter:
    """The routes; `until_disconnect(request, work)` and `deadline_from(headers)` come from app.py."""
    router = APIRouter()

    @router.get("/health", tags=["health"], responses={503: {"model": schema.HealthStatus}})
    async def health() -> Response:
        """vLLM's health check: 200 when ready to serve (as /health/ready), 503 otherwise."""
        return _health(engine, ready=True)

    @router.get("/v2/health/live", tags=["health"])
    async def v2_live() -> Response:
        """KServe v2 liveness (as /health/live)."""
        return _health(engine, ready=False)

    @router.get("/v2/health/ready", tags=["health"], responses={503: {"model": schema.HealthStatus}})
    async def v2_ready() -> Response:
        """KServe v2 readiness (as /health/ready)."""
        return _health(engine, ready=True)

    @router.post("/v1/completions", tags=["openai"], responses=_ERRORS)
    async def completions(req: oai.CompletionRequest, request: Request) -> JSONResponse:
        """OpenAI legacy completions with vLLM's extensions; see docs/api.md for what is supported."""
        work = _completions(engine, req, deadline_from(request.headers))
        return JSONResponse(await until_disconnect(request, work))

    @router.post("/v1/chat/completions", tags=["openai"], responses=_ERRORS)
    async def chat_completions(req: oai.ChatCompletionRequest, request: Request) -> JSONResponse:
        """OpenAI chat completions on the teacher's chat template; see docs/api.md."""
        work = _chat(engine, req, deadline_from(request.headers))
        return JSONResponse(await until_disconnect(request, work))

    return router


def _health(engine: TeacherEngine, ready: bool) -> Response:
    if not ready or engine.ready:
        return JSONResponse({"status": "ok"})
    status = "draining" if engine.draining else "loading"
    return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "2"})


async def _completions(engine: TeacherEngine, req: oai.CompletionRequest, deadline: float | None) -> dict:
    backend = engine.backend(req.model)
    info = backend.info
    params.reject_unsupported(req)
    n = params.samples_per_prompt(req)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    if max_tokens < 0:
        raise InvalidRequest(
            f"max_tokens = {max_tokens} must be >= 0 (0: score the prompt only)", field="max_tokens"
        )
    logprobs = params.top_count("logprobs", req.logprobs, info)
    prompt_k = params.top_count("prompt_logprobs", req.prompt_logprobs, info)
    echo = bool(req.echo)
    if prompt_k is None and echo:  # vLLM: echo with logprobs implies prompt_logprobs = logprobs
        prompt_k = logprobs
    prompts = params.completion_prompts(req, backend)
    params.check_lengths(prompts, max_tokens, n, info, "max_tokens")
    params.check_generation_tokens("max_tokens", max_tokens, engine.limits.max_generation_tokens)
    sampling = params.sampling_params(req, max_tokens, logprobs or 0, info) if max_tokens else None

    top_k = max(prompt_k or 0, logprobs or 0, 1)
    scored = (
        await _score_prompts(engine, info.name, prompts, top_k, deadline) if prompt_k is not None else None
    )
    samples = await _generate(engine, info.name, prompts, sampling, n)

    text = shape.TokenText(backend, as_ids=bool(req.return_tokens_as_token_ids))
    choices: list[dict] = []
    for i, prompt in enumerate(prompts):
        rows = shape.prompt_rows(prompt.ids, scored[i]) if scored is not None else None
        prompt_lps = None if rows is None or prompt_k is None else shape.prompt_logprobs(rows, prompt_k, text)
        for sample in samples[i]:
            choice: dict = {"index": len(choices), "text": (prompt.text if echo else "") + sample.text}
            if logprobs is not None:
                gen = shape.sample_rows(sample)
                if echo:
                    assert rows is not None, "echo with logprobs scores the prompt (prompt_k = logprobs)"
                    gen = rows + gen
                choice["logprobs"] = shape.completion_logprobs(gen, logprobs, text)
            else:
                choice["logprobs"] = None
            choice["finish_reason"] = sample.finish_reason
            choice["stop_reason"] = sample.stop_reason
            choice["prompt_logprobs"] = prompt_lps
            if req.return_token_ids:
                choice["prompt_token_ids"], choice["token_ids"] = prompt.ids, sample.token_ids
            choices.append(choice)
    completion_tokens = sum(len(s.token_ids) for per_prompt in samples for s in per_prompt)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": info.name,
        "choices": choices,
        "usage": shape.usage(sum(len(p.ids) for p in prompts), completion_tokens),
        "system_fingerprint": None,
    }


async def _chat(engine: TeacherEngine, req: oai.ChatCompletionRequest, deadline: float | None) -> dict:
    backend = engine.backend(req.model)
    info = backend.info
    params.reject_unsupported(req)
    n = params.samples_per_prompt(req)
    messages = params.chat_messages(req)
    try:
        rendered = backend.render_chat(messages, req.add_generation_prompt)
    except ValueError as e:  # no chat template
        raise InvalidRequest(str(e), field="messages") from e
    prompt = Prompt(
        ids=backend.tokenize_text(rendered, add_special_tokens=req.add_special_tokens), text=rendered
    )
    if not prompt.ids:
        raise InvalidRequest("the rendered messages hold no tokens", field="messages")
    if len(prompt.ids) >= info.max_sequence_len:
        raise TooManyTokens(
            f"the rendered messages hold {len(prompt.ids)} tokens, leaving no room to generate within "
            f"max_sequence_len = {info.max_sequence_len} of model {info.name!r}",
            field="messages",
        )
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    limit = engine.limits.max_generation_tokens
    if max_tokens is None:  # as much as fits, like vLLM, up to the server's generation limit
        max_tokens = min(info.max_sequence_len - len(prompt.ids), (info.max_tokens - len(prompt.ids)) // n)
        max_tokens = max(min(max_tokens, limit), 1)
    elif max_tokens < 1:
        raise InvalidRequest(f"{field} = {max_tokens} must be >= 1", field=field)
    params.check_lengths([prompt], max_tokens, n, info, field)
    params.check_generation_tokens(field, max_tokens, limit)
    top_n = params.top_count("top_logprobs", req.top_logprobs, info)
    if top_n is not None and not req.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs = true", field="top_logprobs")
    prompt_k = params.top_count("prompt_logprobs", req.prompt_logprobs, info)
    sampling = params.sampling_params(req, max_tokens, top_n or 0, info)

    scored = None
    if prompt_k is not None:
        scored = await _score_prompts(engine, info.name, [prompt], max(prompt_k, 1), deadline)
    (samples,) = await _generate(engine, info.name, [prompt], sampling, n)

    text = shape.TokenText(backend, as_ids=bool(req.return_tokens_as_token_ids))
    choices: list[dict] = []
    for sample in samples:
        choice = {
            "index": len(choices),
            "message": {"role": "assistant", "content": sample.text, "refusal": None, "tool_calls": []},
            "logprobs": shape.chat_logprobs(shape.sample_rows(sample), top_n or 0, text)
            if req.logprobs
            else None,
            "finish_reason": sample.finish_reason,
            "stop_reason": sample.stop_reason,
        }
        if req.return_token_ids:
            choice["token_ids"] = sample.token_ids
        choices.append(choice)
    body = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": info.name,
        "choices": choices,
        "usage": shape.usage(len(prompt.ids), sum(len(s.token_ids) for s in samples)),
        "system_fingerprint": None,
        "prompt_logprobs": None,
    }
    if scored is not None:
        assert prompt_k is not None, "the prompt is scored for prompt_logprobs only"
        body["prompt_logprobs"] = shape.prompt_logprobs(
            shape.prompt_rows(prompt.ids, scored[0]), prompt_k, text
        )
    if req.return_token_ids:
        body["prompt_token_ids"] = prompt.ids
    return body


async def _score_prompts(
    engine: TeacherEngine, name: str, prompts: list[Prompt], top_k: int, deadline: float | None
) -> list:
    """Per prompt, /v1/score's answer for token_ids = prompt, prompt_len = 1 (with ranks); None for 1 token."""
    scorable = [i for i, p in enumerate(prompts) if len(p.ids) > 1]
    out: list = [None] * len(prompts)
    if not scorable:
        return out
    req = schema.ScoreRequest(
        model=name,
        sequences=[schema.Sequence(token_ids=prompts[i].ids, prompt_len=1) for i in scorable],
        top_k=top_k,
    )
    result = await engine.score(req, deadline, ranks=True)
    for i, scores in zip(scorable, result.sequences, strict=True):
        out[i] = scores
    return out


async def _generate(
    engine: TeacherEngine, name: str, prompts: list[Prompt], sampling: SamplingParams | None, n: int
) -> list[list[Sample]]:
    """Per prompt, its n samples; without sampling (max_tokens = 0), n empty ones that end for "length"."""
    if sampling is None:  # as vLLM's echo-only requests
        return [[Sample(finish_reason="length") for _ in range(n)] for _ in prompts]
    return [await engine.generate(name, p.ids, sampling) for p in prompts]
