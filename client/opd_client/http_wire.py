"""The HTTP wire protocol of the teacher service as the clients speak it: requests, answers, errors, retries.

Pure functions (and one frozen request type), so the blocking and the async client in http_client.py
share every decision and differ only in how they send a request and how they sleep between retries.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import httpx
from google.protobuf.message import DecodeError

from opd_client import convert, schema
from opd_client.base import SequenceLike, make_score_request
from opd_client.endpoints import Endpoints
from opd_client.errors import DeadlineExceeded, OpdError, Unavailable, error_for_http
from opd_client.retry import RetryPolicy, parse_retry_after
from opd_client.scores import ScoreResult
from opd_client.v1 import teacher_pb2 as pb

logger = logging.getLogger("opd_client.http_client")  # the clients' logger: retries are the clients' news

# Failures where the request may not have reached the model, or its answer got lost: worth resending
# (scoring is a pure function, so a repeated POST is harmless). Config mistakes such as a bad URL
# scheme (httpx.UnsupportedProtocol) are not in here and surface at once.
RETRYABLE_TRANSPORT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
_SNIPPET_CHARS = 200
DEFAULT_RETRY = RetryPolicy()  # frozen, so one shared default is safe

JSON = "application/json"
PROTOBUF = "application/x-protobuf"
# Errors are JSON whatever we ask for, so JSON stays acceptable, ranked below protobuf.
ACCEPT_PROTOBUF = f"{PROTOBUF}, {JSON};q=0.5"
ScoreFormat = Literal["protobuf", "binary", "json"]
OCTET_STREAM = "application/octet-stream"
# A head's bytes arrive in pieces of this size (the service streams 4 MiB chunks).
HEAD_CHUNK_BYTES = 1 << 22
# A binary request body (a weight push) leaves in pieces of this size (content_of says why).
BODY_PIECE_BYTES = 1 << 20


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: dict | None = None
    accept: str = JSON
    content: bytes | Path | None = None  # a binary body (a weight push) instead of the JSON one

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


# ---- requests ---------------------------------------------------------------------------------------


def default_headers(api_key: str | None, timeout: float) -> dict[str, str]:
    # The server drops a queued request once we stop waiting for it (X-Request-Timeout).
    headers = {"Accept": JSON, "X-Request-Timeout": f"{timeout:g}"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def tokenize_request(
    text: str | None, messages: list[dict] | None, model: str | None, add_generation_prompt: bool
) -> Request:
    # model_validate: the messages are dicts, which the schema validates into ChatMessages.
    body = schema.TokenizeRequest.model_validate(
        {"model": model, "text": text, "messages": messages, "add_generation_prompt": add_generation_prompt}
    ).model_dump(exclude_none=True)
    return Request("POST", "/v1/tokenize", body)


def score_request(
    sequences: Seq[SequenceLike],
    top_k: int,
    temperature: float | None,
    score_ids: list | None,
    model: str | None,
    format: ScoreFormat,
    logprob_dtype: schema.LogprobDtype,
    return_hidden: bool = False,
    hidden_dtype: str | None = None,
) -> Request:
    protobuf = format == "protobuf"
    req = make_score_request(
        sequences,
        top_k,
        temperature=temperature,
        score_ids=score_ids,
        model=model,
        format="json" if format == "protobuf" else format,  # the JSON-body format; Accept decides on protobuf
        return_hidden=return_hidden,
        hidden_dtype=hidden_dtype,
    )
    # Not validated here: the service checks logprob_dtype and names the field in its error, the same
    # answer every client gets.
    req = req.model_copy(update={"logprob_dtype": logprob_dtype})
    body = req.model_dump(exclude_none=True, exclude={"format"} if protobuf else None)
    return Request("POST", "/v1/score", body, accept=ACCEPT_PROTOBUF if protobuf else JSON)


def head_request(name: str) -> Request:
    """GET the safetensors bytes of teacher `name`'s output head (streamed; see opd_client.head_cache)."""
    return Request("GET", f"/v1/models/{quote(name, safe='')}/head", accept=OCTET_STREAM)


def weights_request(name: str, weights: bytes | Path, all_tensors: bool = False) -> Request:
    """PUT a safetensors file (bytes, or a path streamed from disk) as teacher `name`'s new weights."""
    query = "?all_tensors=true" if all_tensors else ""
    return Request("PUT", f"/v1/models/{quote(name, safe='')}/weights{query}", content=weights)


def reload_request(name: str, path: str, all_tensors: bool = False) -> Request:
    body = schema.ReloadRequest(path=path, all_tensors=all_tensors).model_dump()
    return Request("POST", f"/v1/models/{quote(name, safe='')}/reload", body)


def content_of(request: Request) -> Iterator[bytes] | None:
    """What httpx sends as the binary body, in pieces made anew for every attempt.

    Never one big bytes object: httpcore's blocking write keeps `buffer = buffer[n:]` after each partial
    send, which copies the rest of the body every time (measured: a 400 MB body took 15 s over loopback
    in one piece, 0.3 s in 1 MiB pieces)."""
    if isinstance(request.content, Path):
        return _file_pieces(request.content)
    if request.content is not None:
        return _byte_pieces(request.content)
    return None


def _byte_pieces(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), BODY_PIECE_BYTES):
        yield bytes(view[start : start + BODY_PIECE_BYTES])


def _file_pieces(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while piece := f.read(BODY_PIECE_BYTES):
            yield piece


def content_headers(request: Request) -> dict[str, str]:
    """Accept, and for a binary body its type and length (sent in pieces, it is not chunked)."""
    headers = {"Accept": request.accept}
    if isinstance(request.content, Path):
        headers["Content-Length"] = str(request.content.stat().st_size)
    elif request.content is not None:
        headers["Content-Length"] = str(len(request.content))
    if request.content is not None:
        headers["Content-Type"] = OCTET_STREAM
    return headers


def chunk_score_request(req: schema.ChunkScoreRequest | dict) -> Request:
    req = req if isinstance(req, schema.ChunkScoreRequest) else schema.ChunkScoreRequest(**req)
    return Request("POST", "/v1/chunk-score", req.model_dump(exclude_none=True))


# ---- responses --------------------------------------------------------------------------------------


def _snippet(response: httpx.Response) -> str:
    text = " ".join(response.text.split())
    return text[:_SNIPPET_CHARS] + ("..." if len(text) > _SNIPPET_CHARS else "")


def error_from_response(request: Request, response: httpx.Response) -> OpdError:
    """The OpdError for a non-2xx answer: opd's error body, FastAPI's {"detail"} or anything else."""
    status = response.status_code
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        detail = body["error"]
        message = str(detail.get("message") or f"HTTP {status}")
        return error_for_http(status, message, detail.get("param"), retry_after)
    if isinstance(body, dict) and "detail" in body:  # routes FastAPI answers itself (405, unknown path)
        return error_for_http(status, f"{request}: HTTP {status}: {body['detail']}", None, retry_after)
    # Not from the teacher at all, e.g. a proxy's HTML 502 page: say so, with the start of the body.
    message = (
        f"{request}: HTTP {status} {response.reason_phrase} with a non-JSON body: {_snippet(response)!r}"
    )
    return error_for_http(status, message, None, retry_after)


def body_or_error(request: Request, response: httpx.Response) -> dict:
    """The JSON body of a successful answer; raises the OpdError for anything else."""
    if not response.is_success:
        raise error_from_response(request, response)
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise OpdError(
            f"{request}: HTTP {response.status_code} but the body is not a JSON object: "
            f"{_snippet(response)!r}"
        )
    return body


def score_or_error(request: Request, response: httpx.Response) -> ScoreResult:
    """The ScoreResult of a successful answer, protobuf or JSON by its Content-Type; else raises."""
    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if not response.is_success or media_type != PROTOBUF:
        return convert.score_result_from_json(body_or_error(request, response))
    msg = pb.ScoreResponse()
    try:
        msg.ParseFromString(response.content)
    except DecodeError as e:
        raise OpdError(
            f"{request}: HTTP {response.status_code} but the {PROTOBUF} body does not parse "
            f"({len(response.content)} bytes): {e}"
        ) from e
    return convert.score_result_from_proto(msg)


def models_from_body(body: dict) -> list[schema.ModelInfo]:
    # Entries carry OpenAI's id/object/owned_by as well; ModelInfo keeps only opd's fields.
    return [schema.ModelInfo.model_validate(entry) for entry in body["data"]]


def token_ids_from_body(body: dict) -> list[int]:
    return [int(i) for i in body["token_ids"]]


def chunk_scores_from_body(body: dict) -> schema.ChunkScoreResponse:
    return schema.ChunkScoreResponse.model_validate(body)


def weights_update_from_body(body: dict) -> schema.WeightsUpdate:
    return schema.WeightsUpdate.model_validate(body)


# ---- retries ----------------------------------------------------------------------------------------


def _describe(error: BaseException) -> str:
    if isinstance(error, OpdError):
        return f"HTTP {error.http_status} {type(error).__name__}: {error.message}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def retry_delay(
    policy: RetryPolicy, error: BaseException, attempt: int, request: Request, endpoints: Endpoints, url: str
) -> float | None:
    """Seconds to wait before the next try (logged), or None to give up.

    A replica that failed sits out its cooldown (the server's Retry-After when it sent one); when another
    replica can take the request, the next try goes there at once instead of waiting.
    """
    if not policy.should_retry(error, attempt):
        return None
    retry_after = getattr(error, "retry_after", None)
    endpoints.mark_down(url, retry_after)
    delay = 0.0 if endpoints.any_available(besides=url) else policy.delay(attempt, retry_after)
    logger.warning(
        "%s at %s failed (%s); retry %d/%d in %.2f s",
        request,
        url,
        _describe(error),
        attempt,
        policy.max_attempts - 1,
        delay,
    )
    return delay


def transport_failure(
    error: httpx.TransportError, attempts: int, request: Request, base_url: str, timeout: float
) -> OpdError:
    tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
    if isinstance(error, httpx.TimeoutException):
        return DeadlineExceeded(
            f"{request} at {base_url}: no answer within {timeout:g} s ({type(error).__name__}) after {tries}"
        )
    return Unavailable(
        f"{request} at {base_url}: could not reach the teacher ({_describe(error)}) after {tries}"
    )
