"""POST /v1/chunk-score: black-box scoring of a student's completion (see opd_teacher.blackbox.chunk_scorer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request

from opd_client import schema
from opd_teacher.engine import TeacherEngine

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schema.ErrorBody} for status in (400, 401, 404, 413, 422, 429, 502, 503)
}


def chunk_score_router(engine: TeacherEngine, until_disconnect: Callable) -> APIRouter:
    router = APIRouter()

    @router.post(
        "/v1/chunk-score", response_model=schema.ChunkScoreResponse, tags=["teacher"], responses=_ERRORS
    )
    async def chunk_score(req: schema.ChunkScoreRequest, request: Request) -> schema.ChunkScoreResponse:
        """Chunks of the student's completion rewarded by their similarity to the teacher's own
        continuations of the same prefix, asked from the teacher's OpenAI-compatible chat API.

        Per chunk: mean/max embedding cosine and edit similarity of the N samples, the matches k (cosine
        at or above `similarity_threshold`), the smoothed reward (k + alpha·prior)/(N + alpha), and how
        many of the chunk's tokens the teacher's greedy continuation accepts (with the teacher's logprobs
        of them where its top_logprobs tell). `usage` is what the request cost at the API. 429/503 carry
        Retry-After when the API is rate-limiting or down; 502 means it gave an answer we cannot use.
        """
        return await until_disconnect(request, engine.chunk_score(req))

    return router
