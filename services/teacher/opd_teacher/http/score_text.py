"""POST /v1/score-text: the teacher's logprobs of its own tokens of a text (opd_teacher.text_scoring)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request

from opd_client import schema
from opd_teacher.engine import TeacherEngine
from opd_teacher.text_scoring import score_text

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schema.ErrorBody} for status in (400, 401, 404, 413, 422, 429, 503)
}


def score_text_router(
    engine: TeacherEngine, until_disconnect: Callable, deadline_from: Callable
) -> APIRouter:
    router = APIRouter()

    @router.post(
        "/v1/score-text", response_model=schema.ScoreTextResponse, tags=["teacher"], responses=_ERRORS
    )
    async def score_text_endpoint(req: schema.ScoreTextRequest, request: Request) -> schema.ScoreTextResponse:
        """Score each completion text as the teacher tokenizes it, after its prompt (chat messages
        rendered with the teacher's chat template, or raw text): per teacher token its logprob, its
        [start, end) byte span in the completion (the spans tile the text) and, with top_k, its top-k as
        strings. For trainers whose tokenizer differs from the teacher's (docs/api.md). Same limits and
        errors as /v1/score; an error's field names the text request's sequence.
        """
        return await until_disconnect(request, score_text(engine, req, deadline_from(request.headers)))

    return router
