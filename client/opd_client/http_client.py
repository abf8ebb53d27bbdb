"""HTTP clients of the teacher service: HttpTeacherClient (sync) and AsyncHttpTeacherClient (async).

    client = HttpTeacherClient("http://127.0.0.1:8000", api_key="...")
    result = client.score([{"token_ids": ids, "prompt_len": 12}], top_k=20)

Both classes build their requests and decode the answers with the module-level functions below, so they
differ only in how they send a request and how they sleep between retries. Every failure reaches the
caller as an OpdError: server errors keep their type (InvalidRequest, Overloaded, ...), and a network
failure that outlasts the retries becomes Unavailable (unreachable) or DeadlineExceeded (no answer in time).

Scores are fetched as protobuf by default (`Accept: application/x-protobuf`, an opd.v1.ScoreResponse with
raw little-endian arrays); format="binary" (base64 JSON) and format="json" (lists, for reading by eye)
stay available. Every format decodes to the same ScoreResult, logprobs as float32.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Literal, TypeVar

import httpx
from google.protobuf.message import DecodeError

from opd_client import convert, schema
from opd_client.base import SequenceLike, make_score_request
from opd_client.endpoints import Endpoints
from opd_client.errors import DeadlineExceeded, OpdError, Unavailable, error_for_http
from opd_client.retry import RetryPolicy, parse_retry_after
from opd_client.scores import ScoreResult
from opd_client.v1 import teacher_pb2 as pb

logger = logging.getLogger(__name__)

# Failures where the request may not have reached the model, or its answer got lost: worth resending
# (scoring is a pure function, so a repeated POST is harmless). Config mistakes such as a bad URL
# scheme (httpx.UnsupportedProtocol) are not in here and surface at once.
_RETRYABLE_TRANSPORT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
_SNIPPET_CHARS = 200
_DEFAULT_RETRY = RetryPolicy()  # frozen, so one shared default is safe

JSON = "application/json"
PROTOBUF = "application/x-protobuf"
# Errors are JSON whatever we ask for, so JSON stays acceptable, ranked below protobuf.
_ACCEPT_PROTOBUF = f"{PROTOBUF}, {JSON};q=0.5"
ScoreFormat = Literal["protobuf", "binary", "json"]
_T = TypeVar("_T")


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    body: dict | None = None
    accept: str = JSON

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


# ---- requests ---------------------------------------------------------------------------------------


def _headers(api_key: str | None, timeout: float) -> dict[str, str]:
    # The server drops a queued request once we stop waiting for it (X-Request-Timeout).
    headers = {"Accept": JSON, "X-Request-Timeout": f"{timeout:g}"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _tokenize_request(
    text: str | None, messages: list[dict] | None, model: str | None, add_generation_prompt: bool
) -> _Request:
    body = schema.TokenizeRequest(
        model=model, text=text, messages=messages, add_generation_prompt=add_generation_prompt
    ).model_dump(exclude_none=True)
    return _Request("POST", "/v1/tokenize", body)


def _score_request(
    sequences: Seq[SequenceLike],
    top_k: int,
    temperature: float | None,
    score_ids: list | None,
    model: str | None,
    format: ScoreFormat,
    logprob_dtype: schema.LogprobDtype,
) -> _Request:
    protobuf = format == "protobuf"
    req = make_score_request(
        sequences,
        top_k,
        temperature=temperature,
        score_ids=score_ids,
        model=model,
        format="json" if protobuf else format,  # the JSON-body format; Accept decides on protobuf
    )
    # Not validated here: the service checks logprob_dtype and names the field in its error, the same
    # answer every client gets.
    req = req.model_copy(update={"logprob_dtype": logprob_dtype})
    body = req.model_dump(exclude_none=True, exclude={"format"} if protobuf else None)
    return _Request("POST", "/v1/score", body, accept=_ACCEPT_PROTOBUF if protobuf else JSON)


def _chunk_score_request(req: schema.ChunkScoreRequest | dict) -> _Request:
    req = req if isinstance(req, schema.ChunkScoreRequest) else schema.ChunkScoreRequest(**req)
    return _Request("POST", "/v1/chunk-score", req.model_dump(exclude_none=True))


# ---- responses --------------------------------------------------------------------------------------


def _snippet(response: httpx.Response) -> str:
    text = " ".join(response.text.split())
    return text[:_SNIPPET_CHARS] + ("..." if len(text) > _SNIPPET_CHARS else "")


def _error_from_response(request: _Request, response: httpx.Response) -> OpdError:
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


def _body_or_error(request: _Request, response: httpx.Response) -> dict:
    """The JSON body of a successful answer; raises the OpdError for anything else."""
    if not response.is_success:
        raise _error_from_response(request, response)
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


def _score_or_error(request: _Request, response: httpx.Response) -> ScoreResult:
    """The ScoreResult of a successful answer, protobuf or JSON by its Content-Type; else raises."""
    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if not response.is_success or media_type != PROTOBUF:
        return convert.score_result_from_json(_body_or_error(request, response))
    msg = pb.ScoreResponse()
    try:
        msg.ParseFromString(response.content)
    except DecodeError as e:
        raise OpdError(
            f"{request}: HTTP {response.status_code} but the {PROTOBUF} body does not parse "
            f"({len(response.content)} bytes): {e}"
        ) from e
    return convert.score_result_from_proto(msg)


def _models_from_body(body: dict) -> list[schema.ModelInfo]:
    # Entries carry OpenAI's id/object/owned_by as well; ModelInfo keeps only opd's fields.
    return [schema.ModelInfo.model_validate(entry) for entry in body["data"]]


def _token_ids_from_body(body: dict) -> list[int]:
    return [int(i) for i in body["token_ids"]]


def _chunk_scores_from_body(body: dict) -> schema.ChunkScoreResponse:
    return schema.ChunkScoreResponse.model_validate(body)


# ---- retries ----------------------------------------------------------------------------------------


def _describe(error: BaseException) -> str:
    if isinstance(error, OpdError):
        return f"HTTP {error.http_status} {type(error).__name__}: {error.message}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _retry_delay(
    policy: RetryPolicy, error: BaseException, attempt: int, request: _Request, endpoints: Endpoints, url: str
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


def _transport_failure(
    error: httpx.TransportError, attempts: int, request: _Request, base_url: str, timeout: float
) -> OpdError:
    tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
    if isinstance(error, httpx.TimeoutException):
        return DeadlineExceeded(
            f"{request} at {base_url}: no answer within {timeout:g} s ({type(error).__name__}) after {tries}"
        )
    return Unavailable(
        f"{request} at {base_url}: could not reach the teacher ({_describe(error)}) after {tries}"
    )


# ---- clients ----------------------------------------------------------------------------------------


class HttpTeacherClient:
    """Blocking client (httpx.Client); thread-safe, so one instance can serve many threads."""

    def __init__(
        self,
        base_url: str | Seq[str],
        api_key: str | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy = _DEFAULT_RETRY,
        first_replica: int = 0,
    ) -> None:
        """base_url: one teacher, several (a list or "http://a:8000,http://b:8000"), or a name that resolves
        to several addresses; requests go round-robin and fail over between them (opd_client.endpoints),
        starting at replica number `first_replica` (modulo their count)."""
        self.endpoints = Endpoints(base_url, first=first_replica)
        self.base_url = self.endpoints.label
        self.retry = retry
        self.timeout = timeout
        self._http = httpx.Client(headers=_headers(api_key, timeout), timeout=timeout)

    def ready(self) -> bool:
        """True when a teacher answers /health/ready with 200; False if none is ready or reachable."""
        for url in self.endpoints.replicas():
            try:
                if self._http.get(f"{url}/health/ready").status_code == 200:
                    return True
            except httpx.HTTPError:
                continue
        return False

    def models(self) -> list[schema.ModelInfo]:
        return _models_from_body(self._call(_Request("GET", "/v1/models")))

    def tokenize(
        self,
        text: str | None = None,
        messages: list[dict] | None = None,
        model: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Token ids of text, or of chat messages rendered with the teacher's chat template."""
        request = _tokenize_request(text, messages, model, add_generation_prompt)
        return _token_ids_from_body(self._call(request))

    def score(
        self,
        sequences: Seq[SequenceLike],
        top_k: int,
        *,
        temperature: float | None = None,
        score_ids: list | None = None,
        model: str | None = None,
        logprob_dtype: schema.LogprobDtype = "float32",
        format: ScoreFormat = "protobuf",
    ) -> ScoreResult:
        """Teacher scores of each sequence's completion.

        format: "protobuf" (default, raw arrays: 8·K + 8 bytes per scored position), "binary" (base64 in
        JSON, 4/3 of that) or "json" (lists, for debugging). logprob_dtype="float16" halves the logprob
        bytes at ~3 significant digits; the arrays returned are float32 either way.
        """
        request = _score_request(sequences, top_k, temperature, score_ids, model, format, logprob_dtype)
        return self._call(request, _score_or_error)

    def chunk_score(self, request: schema.ChunkScoreRequest | dict) -> schema.ChunkScoreResponse:
        """Black-box scoring of one student completion (a teacher served with --backend openai): per
        chunk the similarity of the teacher's samples, the smoothed reward and the accepted tokens."""
        return _chunk_scores_from_body(self._call(_chunk_score_request(request)))

    def _call(
        self,
        request: _Request,
        decode: Callable[[_Request, httpx.Response], _T] = _body_or_error,
    ) -> _T:
        for attempt in range(1, max(1, self.retry.max_attempts) + 1):
            url = self.endpoints.pick()
            try:
                response = self._http.request(
                    request.method, url + request.path, json=request.body, headers={"Accept": request.accept}
                )
                return decode(request, response)
            except (OpdError, *_RETRYABLE_TRANSPORT) as error:
                delay = _retry_delay(self.retry, error, attempt, request, self.endpoints, url)
                if delay is None:
                    if isinstance(error, OpdError):
                        raise
                    raise _transport_failure(error, attempt, request, url, self.timeout) from error
                time.sleep(delay)
        raise AssertionError("unreachable: the last attempt either returns or raises")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HttpTeacherClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncHttpTeacherClient:
    """The same methods as HttpTeacherClient, as coroutines (httpx.AsyncClient)."""

    def __init__(
        self,
        base_url: str | Seq[str],
        api_key: str | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy = _DEFAULT_RETRY,
    ) -> None:
        self.endpoints = Endpoints(base_url)
        self.base_url = self.endpoints.label
        self.retry = retry
        self.timeout = timeout
        self._http = httpx.AsyncClient(headers=_headers(api_key, timeout), timeout=timeout)

    async def ready(self) -> bool:
        for url in self.endpoints.replicas():
            try:
                if (await self._http.get(f"{url}/health/ready")).status_code == 200:
                    return True
            except httpx.HTTPError:
                continue
        return False

    async def models(self) -> list[schema.ModelInfo]:
        return _models_from_body(await self._call(_Request("GET", "/v1/models")))

    async def tokenize(
        self,
        text: str | None = None,
        messages: list[dict] | None = None,
        model: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        request = _tokenize_request(text, messages, model, add_generation_prompt)
        return _token_ids_from_body(await self._call(request))

    async def score(
        self,
        sequences: Seq[SequenceLike],
        top_k: int,
        *,
        temperature: float | None = None,
        score_ids: list | None = None,
        model: str | None = None,
        logprob_dtype: schema.LogprobDtype = "float32",
        format: ScoreFormat = "protobuf",
    ) -> ScoreResult:
        request = _score_request(sequences, top_k, temperature, score_ids, model, format, logprob_dtype)
        return await self._call(request, _score_or_error)

    async def chunk_score(self, request: schema.ChunkScoreRequest | dict) -> schema.ChunkScoreResponse:
        return _chunk_scores_from_body(await self._call(_chunk_score_request(request)))

    async def _call(
        self,
        request: _Request,
        decode: Callable[[_Request, httpx.Response], _T] = _body_or_error,
    ) -> _T:
        for attempt in range(1, max(1, self.retry.max_attempts) + 1):
            url = self.endpoints.pick()
            try:
                response = await self._http.request(
                    request.method, url + request.path, json=request.body, headers={"Accept": request.accept}
                )
                return decode(request, response)
            except (OpdError, *_RETRYABLE_TRANSPORT) as error:
                delay = _retry_delay(self.retry, error, attempt, request, self.endpoints, url)
                if delay is None:
                    if isinstance(error, OpdError):
                        raise
                    raise _transport_failure(error, attempt, request, url, self.timeout) from error
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt either returns or raises")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncHttpTeacherClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
