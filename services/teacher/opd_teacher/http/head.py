"""GET /v1/models/{name}/head: a teacher's output head as safetensors (opd_teacher.backends.head)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from opd_client import schema
from opd_client.errors import NotFound
from opd_teacher.engine import TeacherEngine

SAFETENSORS = "application/octet-stream"
_ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": schema.ErrorBody} for status in (401, 404, 503)}
_OK = {
    "description": "The safetensors file: tensor `weight` [V, D] in the model's dtype, and `bias` [V] if the "
    "model's head has one. Its sha256 is the model's `head_sha256` in /v1/models (also the ETag)",
    "content": {SAFETENSORS: {"schema": {"type": "string", "format": "binary"}}},
}


def head_router(engine: TeacherEngine) -> APIRouter:
    router = APIRouter()

    # {name:path}: a teacher alias may hold a "/" (sent as %2F or plain).
    @router.get(
        "/v1/models/{name:path}/head",
        tags=["teacher"],
        responses={200: _OK, 304: {"description": "If-None-Match matched the ETag"}, **_ERRORS},
    )
    async def head(name: str, request: Request) -> Response:
        """The output head that turns the hidden states of `return_hidden` into the teacher's logits:
        logits = (h · weightᵀ + bias) · logit_scale, soft-capped by final_logit_softcapping (docs/api.md).

        Streamed in 4 MiB chunks with Content-Length; the ETag is the quoted sha256, so a client that
        caches by it can send If-None-Match and get 304.
        """
        export = engine.backend(name).head
        if export is None:
            raise NotFound(
                f"teacher {name!r} serves no output head (black-box, or its logits are not the head formula: "
                "see hidden_size in /v1/models and the service's log)",
                field="name",
            )
        etag = f'"{export.sha256}"'
        if request.headers.get("if-none-match") in (etag, export.sha256, "*"):
            return Response(status_code=304, headers={"ETag": etag})

        async def body() -> AsyncIterator[bytes]:
            for _, chunk in export.chunks():
                yield chunk

        headers = {
            "ETag": etag,
            "Content-Length": str(len(export.data)),
            "Content-Disposition": f'attachment; filename="{export.sha256}.safetensors"',
        }
        return StreamingResponse(body(), media_type=SAFETENSORS, headers=headers)

    return router
