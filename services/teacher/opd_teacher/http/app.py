"""The HTTP face of the teacher service (FastAPI). Endpoints call the engine; nothing here knows torch."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from opd_client import convert, schema
from opd_client.errors import InvalidRequest, OpdError, Unavailable
from opd_teacher import metrics
from opd_teacher.engine import TeacherEngine
from opd_teacher.http.auth import BearerAuth
from opd_teacher.http.chunk_score import chunk_score_router
from opd_teacher.http.errors import ClientGone, install_error_handlers
from opd_teacher.http.head import head_router
from opd_teacher.http.openai_compat import openai_router
from opd_teacher.http.score_text import score_text_router
from opd_teacher.http.sglang_compat import sglang_router
from opd_teacher.http.vllm_generate import vllm_generate_router
from opd_teacher.http.weights import weights_router

_ERRORS: dict[int | str, dict[str, Any]] = {  # FastAPI's type for `responses`
    400: {"model": schema.ErrorBody},
    401: {"model": schema.ErrorBody},
    404: {"model": schema.ErrorBody},
    413: {"model": schema.ErrorBody},
    422: {"model": schema.ErrorBody},
    503: {"model": schema.ErrorBody},
}

PROTOBUF = "application/x-protobuf"
TIMEOUT_HEADER = "X-Request-Timeout"
T = TypeVar("T")
_JSON_RANGES = ("application/json", "application/*", "*/*")
# The 200 answer's second media type in the OpenAPI docs (FastAPI adds the JSON one from response_model).
_SCORE_OK = {
    "description": "JSON (schema below) by default; with `Accept: application/x-protobuf`, the serialized "
    "`opd.v1.ScoreResponse` of proto/opd/v1/teacher.proto (`format` is then ignored; errors stay JSON)",
    "content": {PROTOBUF: {"schema": {"type": "string", "format": "binary"}}},
}


def wants_protobuf(accept: str | None) -> bool:
    """True when Accept ranks application/x-protobuf (q > 0) at least as high as anything JSON matches."""
    protobuf_q = json_q = 0.0
    for media_range in (accept or "").split(","):
        media, *params = (part.strip() for part in media_range.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media.lower() == PROTOBUF:
            protobuf_q = max(protobuf_q, q)
        elif media.lower() in _JSON_RANGES:
            json_q = max(json_q, q)
    return protobuf_q > 0 and protobuf_q >= json_q


def deadline_from(headers) -> float | None:
    """time.monotonic() after which the client no longer waits, from `X-Request-Timeout: SECONDS`."""
    value = headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise InvalidRequest(
            f"{TIMEOUT_HEADER} = {value!r} must be a positive number of seconds", field=TIMEOUT_HEADER
        )
    return time.monotonic() + seconds


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`, cancelled (and its queued job dropped) if the client hangs up first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise ClientGone()
    return task.result()


async def _disconnected(request: Request) -> None:
    # The body has been read: the next ASGI message is the disconnect, whenever it comes.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine: TeacherEngine, api_keys: set[str] | None = None) -> FastAPI:
    app = FastAPI(
        title="opd teacher service",
        description="White-box teacher scoring for on-policy distillation (see docs/api.md).",
        version="0.1.0",
    )
    install_error_handlers(app)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = route.path if route is not None else "unmatched"
        metrics.REQUESTS.labels(endpoint, str(response.status_code)).inc()
        metrics.REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.get("/health/live", response_model=schema.HealthStatus, tags=["health"])
    async def live() -> dict:
        """The process is up (it may still be loading weights)."""
        return {"status": "ok"}

    @app.get(
        "/health/ready",
        response_model=schema.HealthStatus,
        tags=["health"],
        responses={503: {"model": schema.HealthStatus}},
    )
    async def ready() -> Response:
        """Weights loaded and warm, not draining: send traffic here."""
        if engine.ready:
            return JSONResponse({"status": "ok"})
        status = "draining" if engine.draining else "loading"
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "2"})

    @app.get("/v1/models", response_model=schema.ModelList, tags=["teacher"], responses=_ERRORS)
    async def models() -> dict:
        """The teachers served here (OpenAI's list shape, plus vocab, tokenizer hash and limits)."""
        if not engine.loaded:
            raise Unavailable("the teacher is still loading its weights", retry_after=2)
        cards = [
            {"id": i.name, "object": "model", "owned_by": "opd", **i.model_dump()} for i in engine.infos()
        ]
        return {"object": "list", "data": cards}

    @app.post("/v1/tokenize", response_model=schema.TokenizeResponse, tags=["teacher"], responses=_ERRORS)
    async def tokenize(req: schema.TokenizeRequest) -> schema.TokenizeResponse:
        """Text, or chat messages rendered with the teacher's chat template, to token ids."""
        return engine.tokenize(req)

    @app.post(
        "/v1/score",
        response_model=schema.ScoreResponse,
        tags=["teacher"],
        responses={200: _SCORE_OK, **_ERRORS},
    )
    async def score(req: schema.ScoreRequest, request: Request) -> Response:
        """Teacher logprobs over each sequence's completion: actual token, top-k, tail mass, score_ids;
        with `return_hidden`, also the teacher's final hidden states (`hidden`, [T, D]; top_k may be 0).

        The answer is JSON unless the request says `Accept: application/x-protobuf`: then it is the
        serialized `opd.v1.ScoreResponse` (raw little-endian arrays, 8·K + 8 bytes per scored position
        in float32, 6·K + 4 with `logprob_dtype: "float16"`, plus the score_ids' logprobs). Errors are
        JSON whatever Accept says.
        """
        result = await _until_disconnect(request, engine.score(req, deadline_from(request.headers)))
        # The body depends on Accept, so caches must key on it.
        vary = {"Vary": "Accept"}
        if wants_protobuf(request.headers.get("accept")):
            body = convert.score_result_to_proto(result, req.logprob_dtype).SerializeToString()
            return Response(body, media_type=PROTOBUF, headers=vary)
        binary = req.format == "binary"
        return JSONResponse(convert.score_result_to_json(result, binary, req.logprob_dtype), headers=vary)

    @app.get("/metrics", tags=["ops"])
    async def prometheus() -> PlainTextResponse:
        metrics.READY.set(1 if engine.ready else 0)
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # /v1/completions, /v1/chat/completions, /health and /v2/health/*: OpenAI/vLLM/KServe clients as they are
    app.include_router(openai_router(engine, _until_disconnect, deadline_from))
    # /generate, /health_generate: SGLang's native API (slime, miles)
    app.include_router(sglang_router(engine, _until_disconnect, deadline_from))
    # /inference/v1/generate: vLLM's tokens-in/tokens-out route with prompt_logprobs (prime-rl)
    app.include_router(vllm_generate_router(engine, _until_disconnect, deadline_from))
    # /v1/chunk-score: black-box teachers (an OpenAI-compatible API behind --backend openai)
    app.include_router(chunk_score_router(engine, _until_disconnect))
    # /v1/models/{name}/head: the output head for trainers that score from hidden states (return_hidden)
    app.include_router(head_router(engine))
    # /v1/score-text: scoring by text, for trainers with another tokenizer (cross-tokenizer distillation)
    app.include_router(score_text_router(engine, _until_disconnect, deadline_from))
    # PUT /v1/models/{name}/weights, POST /v1/models/{name}/reload: live weight updates (--weight-updates)
    app.include_router(weights_router(engine))

    if api_keys:
        app.add_middleware(BearerAuth, api_keys=api_keys)
    return app


__all__ = ["create_app", "OpdError"]
