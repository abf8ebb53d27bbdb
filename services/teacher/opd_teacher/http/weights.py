"""PUT /v1/models/{name}/weights and POST /v1/models/{name}/reload: a teacher's weights replaced live.

The faces only move bytes: the body is spooled to disk as it arrives (weight_updates.WeightsSpool, bounded
by max_weights_bytes), then the engine checks, stages and swaps it (engine.update_weights).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.requests import ClientDisconnect

from opd_client import schema
from opd_client.errors import InvalidRequest
from opd_teacher.engine import TeacherEngine
from opd_teacher.http.errors import ClientGone
from opd_teacher.weight_updates import WeightsSpool, reload_files

SAFETENSORS = "application/octet-stream"
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schema.ErrorBody} for status in (400, 401, 403, 404, 413, 422, 503)
}
_BODY = {
    "requestBody": {
        "required": True,
        "description": "a safetensors file: all the model's tensors or only those that changed, named as in "
        "its state_dict, each in the dtype the model holds (dtype in /v1/models)",
        "content": {SAFETENSORS: {"schema": {"type": "string", "format": "binary"}}},
    }
}


def weights_router(engine: TeacherEngine) -> APIRouter:
    router = APIRouter()

    # {name:path}: a teacher alias may hold a "/" (sent as %2F or plain), as for .../head.
    @router.put(
        "/v1/models/{name:path}/weights",
        response_model=schema.WeightsUpdate,
        tags=["teacher"],
        responses=_ERRORS,
        openapi_extra=_BODY,
    )
    async def push(name: str, request: Request, all_tensors: bool = False) -> schema.WeightsUpdate:
        """New weights for teacher `name`, as a safetensors body. Checked in full before use (names, shapes,
        dtypes, completeness, finite values); then swapped in between two forwards. Every later score
        answer names the new `weights_version`; a refused push leaves the old weights serving.
        `?all_tensors=true`: refuse a body that does not replace every tensor of the model."""
        limit = engine.weights_body_limit(name)  # unknown model, updates off: refused before reading
        with WeightsSpool(limit, engine.weight_limits.weights_spool_dir, _content_length(request)) as spool:
            try:
                async for piece in request.stream():
                    await spool.write(piece)
            except ClientDisconnect:
                raise ClientGone() from None
            path = await spool.finish()
            return await engine.update_weights(name, [path], "push", "body", all_tensors)

    @router.post(
        "/v1/models/{name:path}/reload",
        response_model=schema.WeightsUpdate,
        tags=["teacher"],
        responses=_ERRORS,
    )
    async def reload(name: str, req: schema.ReloadRequest) -> schema.WeightsUpdate:
        """New weights for teacher `name` from a .safetensors file or a directory of shards that the service
        can read (inside --reload-root when set); checked and swapped in as a push is."""
        engine.weights_body_limit(name)
        files = reload_files(req.path, engine.weight_limits.reload_root)
        return await engine.update_weights(name, files, req.path, "path", req.all_tensors)

    return router


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidRequest(f"Content-Length {value!r} is not a number", field="Content-Length") from None
