"""HTTP clients of the teacher service: HttpTeacherClient (sync) and AsyncHttpTeacherClient (async).

    client = HttpTeacherClient("http://127.0.0.1:8000", api_key="...")
    result = client.score([{"token_ids": ids, "prompt_len": 12}], top_k=20)

Both classes build their requests, decode the answers and decide on retries with opd_client.http_wire, so
they differ only in how they send a request and how they sleep between retries. Every failure reaches the
caller as an OpdError: server errors keep their type (InvalidRequest, Overloaded, ...), and a network
failure that outlasts the retries becomes Unavailable (unreachable) or DeadlineExceeded (no answer in time).

Scores are fetched as protobuf by default (`Accept: application/x-protobuf`, an opd.v1.ScoreResponse with
raw little-endian arrays); format="binary" (base64 JSON) and format="json" (lists, for reading by eye)
stay available. Every format decodes to the same ScoreResult, logprobs as float32.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import httpx

from opd_client import head_cache, schema
from opd_client import http_wire as wire
from opd_client.base import SequenceLike
from opd_client.endpoints import Endpoints
from opd_client.errors import OpdError
from opd_client.http_wire import ScoreFormat
from opd_client.retry import RetryPolicy
from opd_client.scores import ScoreResult

if TYPE_CHECKING:  # opd_client.head imports torch, loaded only when a head is asked for
    from opd_client.head import TeacherHead

_T = TypeVar("_T")


class HttpTeacherClient:
    """Blocking client (httpx.Client); thread-safe, so one instance can serve many threads."""

    def __init__(
        self,
        base_url: str | Seq[str],
        api_key: str | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy = wire.DEFAULT_RETRY,
        first_replica: int = 0,
    ) -> None:
        """base_url: one teacher, several (a list or "http://a:8000,http://b:8000"), or a name that resolves
        to several addresses; requests go round-robin and fail over between them (opd_client.endpoints),
        starting at replica number `first_replica` (modulo their count)."""
        self.endpoints = Endpoints(base_url, first=first_replica)
        self.base_url = self.endpoints.label
        self.retry = retry
        self.timeout = timeout
        self._http = httpx.Client(headers=wire.default_headers(api_key, timeout), timeout=timeout)

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
        return wire.models_from_body(self._call(wire.Request("GET", "/v1/models"), wire.body_or_error))

    def tokenize(
        self,
        text: str | None = None,
        messages: list[dict] | None = None,
        model: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Token ids of text, or of chat messages rendered with the teacher's chat template."""
        request = wire.tokenize_request(text, messages, model, add_generation_prompt)
        return wire.token_ids_from_body(self._call(request, wire.body_or_error))

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
        return_hidden: bool = False,
        hidden_dtype: str | None = None,
    ) -> ScoreResult:
        """Teacher scores of each sequence's completion.

        format: "protobuf" (default, raw arrays: 8·K + 8 bytes per scored position), "binary" (base64 in
        JSON, 4/3 of that) or "json" (lists, for debugging). logprob_dtype="float16" halves the logprob
        bytes at ~3 significant digits; the arrays returned are float32 either way.

        return_hidden: each sequence also carries hidden_T_D, the teacher's final hidden states (float32
        whatever hidden_dtype carried them: "float32", "bfloat16" or "float16", default the model's
        dtype); with teacher_head() they give the full distribution (opd_client.head). top_k may be 0.
        """
        request = wire.score_request(
            sequences,
            top_k,
            temperature,
            score_ids,
            model,
            format,
            logprob_dtype,
            return_hidden,
            hidden_dtype,
        )
        return self._call(request, wire.score_or_error)

    def teacher_head(self, name: str | None = None) -> TeacherHead:
        """Teacher `name`'s output head (default: the first teacher), downloaded once into the cache
        (opd_client.head_cache) and verified against the sha256 that /v1/models announces."""
        info = head_cache.head_info(self.models(), name)
        data = head_cache.cached_bytes(info)
        if data is None:
            self._call(
                wire.head_request(info.name), lambda url: self._download_head(url, info), streamed=True
            )
            data = head_cache.cached_bytes(info)
        return head_cache.load(data, info)

    def _download_head(self, url: str, info: schema.ModelInfo) -> Path:
        request = wire.head_request(info.name)
        with self._http.stream("GET", url + request.path, headers={"Accept": request.accept}) as response:
            if not response.is_success:
                response.read()
                raise wire.error_from_response(request, response)
            with head_cache.HeadDownload(info) as sink:
                for chunk in response.iter_bytes(wire.HEAD_CHUNK_BYTES):
                    sink.write(chunk)
                return sink.finish()

    def chunk_score(self, request: schema.ChunkScoreRequest | dict) -> schema.ChunkScoreResponse:
        """Black-box scoring of one student completion (a teacher served with --backend openai): per
        chunk the similarity of the teacher's samples, the smoothed reward and the accepted tokens."""
        return wire.chunk_scores_from_body(self._call(wire.chunk_score_request(request), wire.body_or_error))

    def score_text(self, request: schema.ScoreTextRequest | dict) -> schema.ScoreTextResponse:
        """The teacher's logprobs of its own tokens of each completion text (POST /v1/score-text): per
        teacher token its logprob, byte span in the completion and, with top_k, top-k as strings."""
        req = request if isinstance(request, schema.ScoreTextRequest) else schema.ScoreTextRequest(**request)
        body = req.model_dump(exclude_none=True)
        answer = self._call(wire.Request("POST", "/v1/score-text", body), wire.body_or_error)
        return schema.ScoreTextResponse.model_validate(answer)

    def generate_tokens(
        self,
        token_ids: list[int],
        max_tokens: int,
        temperature: float = 1.0,
        seed: int | None = None,
        model: str | None = None,
    ) -> list[int]:
        """The teacher's own continuation of token_ids, tokens in and tokens out (vLLM's POST
        /inference/v1/generate): up to max_tokens ids sampled at `temperature` (0: greedy), seeded, ending
        with the end-of-sequence token that stopped it, if one did."""
        sampling = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
        body = {"token_ids": token_ids, "sampling_params": sampling, "model": model}
        answer = self._call(wire.Request("POST", "/inference/v1/generate", body), wire.body_or_error)
        return [int(i) for i in answer["choices"][0]["token_ids"]]

    def push_weights(
        self, weights: bytes | Path, model: str | None = None, all_tensors: bool = False
    ) -> schema.WeightsUpdate:
        """New weights for teacher `model` (default: the first): a safetensors file as bytes or a path,
        holding all its tensors or only those that changed, in the dtype the teacher holds them
        (ModelInfo.dtype). The service must run with --weight-updates. Returns the version now served.
        all_tensors: refuse an update that does not replace every tensor of the model.

        With several replicas behind this client, each call updates one of them: push to each replica's
        own URL to update them all."""
        name = model or self.models()[0].name
        return wire.weights_update_from_body(
            self._call(wire.weights_request(name, weights, all_tensors), wire.body_or_error)
        )

    def reload_weights(
        self, path: str, model: str | None = None, all_tensors: bool = False
    ) -> schema.WeightsUpdate:
        """New weights for teacher `model` from a safetensors file or directory on the service's machine."""
        name = model or self.models()[0].name
        return wire.weights_update_from_body(
            self._call(wire.reload_request(name, path, all_tensors), wire.body_or_error)
        )

    def _call(
        self,
        request: wire.Request,
        decode: Callable[..., _T],
        streamed: bool = False,
    ) -> _T:
        """decode(request, response) of the answer, with retries; with `streamed`, decode(url) sends the
        request itself (a download that must not be read into memory at once)."""
        for attempt in range(1, max(1, self.retry.max_attempts) + 1):
            url = self.endpoints.pick()
            try:
                if streamed:
                    return decode(url)
                response = self._http.request(
                    request.method,
                    url + request.path,
                    json=request.body,
                    content=wire.content_of(request),
                    headers=wire.content_headers(request),
                )
                return decode(request, response)
            except (OpdError, *wire.RETRYABLE_TRANSPORT) as error:
                delay = wire.retry_delay(self.retry, error, attempt, request, self.endpoints, url)
                if delay is None:
                    if isinstance(error, OpdError):
                        raise
                    raise wire.transport_failure(error, attempt, request, url, self.timeout) from error
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
        retry: RetryPolicy = wire.DEFAULT_RETRY,
        first_replica: int = 0,
    ) -> None:
        self.endpoints = Endpoints(base_url, first=first_replica)
        self.base_url = self.endpoints.label
        self.retry = retry
        self.timeout = timeout
        self._http = httpx.AsyncClient(headers=wire.default_headers(api_key, timeout), timeout=timeout)

    async def ready(self) -> bool:
        for url in self.endpoints.replicas():
            try:
                if (await self._http.get(f"{url}/health/ready")).status_code == 200:
                    return True
            except httpx.HTTPError:
                continue
        return False

    async def models(self) -> list[schema.ModelInfo]:
        return wire.models_from_body(await self._call(wire.Request("GET", "/v1/models")))

    async def tokenize(
        self,
        text: str | None = None,
        messages: list[dict] | None = None,
        model: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        request = wire.tokenize_request(text, messages, model, add_generation_prompt)
        return wire.token_ids_from_body(await self._call(request))

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
        return_hidden: bool = False,
        hidden_dtype: str | None = None,
    ) -> ScoreResult:
        request = wire.score_request(
            sequences,
            top_k,
            temperature,
            score_ids,
            model,
            format,
            logprob_dtype,
            return_hidden,
            hidden_dtype,
        )
        return await self._call(request, wire.score_or_error)

    async def teacher_head(self, name: str | None = None) -> TeacherHead:
        """As HttpTeacherClient.teacher_head (hashing and loading the file run on this thread)."""
        info = head_cache.head_info(await self.models(), name)
        data = head_cache.cached_bytes(info)
        if data is None:
            await self._call(
                wire.head_request(info.name), lambda url: self._download_head(url, info), streamed=True
            )
            data = head_cache.cached_bytes(info)
        return head_cache.load(data, info)

    async def _download_head(self, url: str, info: schema.ModelInfo) -> Path:
        request = wire.head_request(info.name)
        async with self._http.stream(
            "GET", url + request.path, headers={"Accept": request.accept}
        ) as response:
            if not response.is_success:
                await response.aread()
                raise wire.error_from_response(request, response)
            with head_cache.HeadDownload(info) as sink:
                async for chunk in response.aiter_bytes(wire.HEAD_CHUNK_BYTES):
                    sink.write(chunk)
                return sink.finish()

    async def chunk_score(self, request: schema.ChunkScoreRequest | dict) -> schema.ChunkScoreResponse:
        return wire.chunk_scores_from_body(await self._call(wire.chunk_score_request(request)))

    async def push_weights(
        self, weights: bytes | Path, model: str | None = None, all_tensors: bool = False
    ) -> schema.WeightsUpdate:
        """As HttpTeacherClient.push_weights (a path is read into memory first)."""
        if isinstance(weights, Path):  # the async transport takes async pieces; bytes keep this simple
            weights = await asyncio.to_thread(weights.read_bytes)
        name = model or (await self.models())[0].name
        return wire.weights_update_from_body(
            await self._call(wire.weights_request(name, weights, all_tensors))
        )

    async def reload_weights(
        self, path: str, model: str | None = None, all_tensors: bool = False
    ) -> schema.WeightsUpdate:
        name = model or (await self.models())[0].name
        return wire.weights_update_from_body(await self._call(wire.reload_request(name, path, all_tensors)))

    async def _call(
        self,
        request: wire.Request,
        decode: Callable = wire.body_or_error,
        streamed: bool = False,
    ) -> _T:
        for attempt in range(1, max(1, self.retry.max_attempts) + 1):
            url = self.endpoints.pick()
            try:
                if streamed:
                    return await decode(url)
                response = await self._http.request(
                    request.method,
                    url + request.path,
                    json=request.body,
                    content=_async_pieces(request),
                    headers=wire.content_headers(request),
                )
                return decode(request, response)
            except (OpdError, *wire.RETRYABLE_TRANSPORT) as error:
                delay = wire.retry_delay(self.retry, error, attempt, request, self.endpoints, url)
                if delay is None:
                    if isinstance(error, OpdError):
                        raise
                    raise wire.transport_failure(error, attempt, request, url, self.timeout) from error
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt either returns or raises")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncHttpTeacherClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _async_pieces(request: wire.Request) -> AsyncIterator[bytes] | None:
    """The async transport's binary body: wire.content_of's pieces as an async iterator."""
    pieces = wire.content_of(request)
    if pieces is None:
        return None

    async def agen() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    return agen()
