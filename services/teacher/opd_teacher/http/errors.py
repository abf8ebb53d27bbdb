"""One place that turns exceptions into HTTP error responses (the OpenAI error object shape)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opd_client.errors import InvalidRequest, OpdError, ValidationFailed
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


def error_response(err: OpdError) -> JSONResponse:
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(err.retry_after)))
    if err.http_status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(err.to_body(), status_code=err.http_status, headers=headers)


def field_path(loc: tuple) -> str:
    """('body', 'sequences', 0, 'token_ids', 3) -> 'sequences[0].token_ids[3]'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("list[int]", "int", "float", "str"):  # pydantic's union-branch markers
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def validation_error(exc: RequestValidationError) -> OpdError:
    errors = exc.errors()
    for e in errors:
        if e.get("type") == "json_invalid":
            detail = e.get("ctx", {}).get("error", "")
            return InvalidRequest(f"malformed JSON body: {detail}".rstrip(": "), field="body")
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if tuple(first.get("loc", ())) == ("body",) and isinstance(first.get("input"), bytes | str):
        # FastAPI hands us the raw body when the Content-Type is not JSON (curl -d sends a form type).
        return InvalidRequest(
            "the body must be a JSON object sent with 'Content-Type: application/json'", field="body"
        )
    field = field_path(tuple(first.get("loc", ())))
    got = first.get("input")
    got_text = "" if first.get("type") == "missing" else f" (got {str(got)[:60]!r})"
    more = f"; and {len(errors) - 1} more problem(s)" if len(errors) > 1 else ""
    message = f"{field or 'body'}: {first.get('msg')}{got_text}{more}"
    return ValidationFailed(message, field=field or "body")


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

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(OpdError(f"internal error: {type(exc).__name__}: {exc}"))
