"""One place that turns exceptions into HTTP error responses (the OpenAI error object shape)."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from opd_client.errors import InvalidRequest, OpdError
from opd_teacher.pydantic_errors import validation_failed

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready; nobody reads what we send."""


def error_response(err: OpdError) -> JSONResponse:
    headers = {}
    if err.retry_after is not None:
        # Whole seconds, rounded up so a client that obeys never comes back too early.
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    if err.http_status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(err.to_body(), status_code=err.http_status, headers=headers)


def validation_error(exc: RequestValidationError) -> OpdError:
    errors = exc.errors()
    for e in errors:
        if e.get("type") == "json_invalid":
            detail = e.get("ctx", {}).get("error", "")
            return InvalidRequest(f"malformed JSON body: {detail}".rstrip(": "), field="body")
    first = errors[0] if errors else {}
    if tuple(first.get("loc", ())) == ("body",) and isinstance(first.get("input"), bytes | str):
        # FastAPI hands us the raw body when the Content-Type is not JSON (curl -d sends a form type).
        return InvalidRequest(
            "the body must be a JSON object sent with 'Content-Type: application/json'", field="body"
        )
    return validation_failed(errors)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpdError)
    async def _opd(_: Request, exc: OpdError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = OpdError(str(exc.detail))
        err.http_status = exc.status_code
        err.type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(err)

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, exc: ClientGone) -> Response:
        # 499 "client closed request" (nginx's convention): it only shows in metrics and access logs.
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(OpdError(f"internal error: {type(exc).__name__}: {exc}"))
