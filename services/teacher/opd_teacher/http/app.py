"""The HTTP face of the teacher service (FastAPI). Endpoints call the engine; nothing here knows torch."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from opd_client import convert, schema
from opd_client.errors import OpdError, Unavailable
from opd_teacher import metrics
from opd_teacher.engine import TeacherEngine
from opd_teacher.http.auth import BearerAuth
from opd_teacher.http.errors import install_error_handlers

_ERRORS = {
    400: {"model": schema.ErrorBody},
    401: {"model": schema.ErrorBody},
    404: {"model": schema.ErrorBody},
    413: {"model": schema.ErrorBody},
    422: {"model": schema.ErrorBody},
    503: {"model": schema.ErrorBody},
}


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

    @app.post("/v1/score", response_model=schema.ScoreResponse, tags=["teacher"], responses=_ERRORS)
    async def score(req: schema.ScoreRequest) -> JSONResponse:
        """Teacher logprobs over each sequence's completion: actual token, top-k, tail mass, score_ids."""
        result = await engine.score(req)
        return JSONResponse(convert.score_result_to_json(result, binary=req.format == "binary"))

    @app.get("/metrics", tags=["ops"])
    async def prometheus() -> PlainTextResponse:
        metrics.READY.set(1 if engine.ready else 0)
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    if api_keys:
        app.add_middleware(BearerAuth, api_keys=api_keys)
    return app


__all__ = ["create_app", "OpdError"]
