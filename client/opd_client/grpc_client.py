"""Synchronous gRPC client of the teacher service (`opd.v1.Teacher`), the TeacherClient interface.

    with GrpcTeacherClient("127.0.0.1:50051", api_key="...") as client:
        result = client.score([{"token_ids": ids, "prompt_len": 12}], top_k=20)
        for i, outcome in client.score_stream(requests):   # many requests over one stream
            ...

Failed calls raise opd_client.errors (the same classes the HTTP client raises); busy, unavailable and
timed-out calls are retried with the RetryPolicy, never sooner than the server's retry-after hint.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opd_client import convert, convert_text, head_cache, schema
from opd_client.base import SequenceLike, make_score_request
from opd_client.endpoints import grpc_target
from opd_client.errors import OpdError, TooManyTokens, error_for_grpc
from opd_client.retry import RetryPolicy, parse_retry_after
from opd_client.scores import ScoreResult
from opd_client.v1 import teacher_pb2 as pb
from opd_client.v1 import teacher_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # opd_client.head imports torch, loaded only when a head is asked for
    from opd_client.head import TeacherHead

logger = logging.getLogger(__name__)

# Shared with the server: top_k = vocab answers are ~390 KB per scored position for a 49k vocabulary.
MAX_MESSAGE_BYTES = 256 * 2**20
TEACHER_SERVICE = "opd.v1.Teacher"
# UpdateWeights pieces: under gRPC's default 4 MiB message limit, which third-party servers keep.
WEIGHTS_CHUNK_BYTES = 2 * 2**20
DEFAULT_RETRY = RetryPolicy()
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class NotSupported(OpdError, NotImplementedError):
    """The call exists on another transport only."""

    http_status = 501
    grpc_code = "UNIMPLEMENTED"
    type = "not_supported_error"


class GrpcTeacherClient:
    def __init__(
        self,
        target: str | Seq[str],
        api_key: str | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy = DEFAULT_RETRY,
    ):
        self.target = target
        self.timeout = timeout
        self.retry = retry
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._channel = _open_channel(target)
        self._stub = pb_grpc.TeacherStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # ---- TeacherClient ------------------------------------------------------------------------------

    def ready(self) -> bool:
        """True when the teacher answers SERVING to a health check (no key needed)."""
        try:
            reply = self._health.Check(
                health_pb2.HealthCheckRequest(service=TEACHER_SERVICE), timeout=min(self.timeout, 5.0)
            )
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def models(self) -> list[schema.ModelInfo]:
        reply = self._call("GetInfo", pb.GetInfoRequest())
        return [convert.model_info_from_proto(m) for m in reply.models]

    def tokenize(
        self,
        text: str | None = None,
        messages: list[dict] | None = None,
        model: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        raise NotSupported(
            "tokenize is HTTP-only: the gRPC schema (opd.v1.Teacher) has no Tokenize; "
            "use HttpTeacherClient(...).tokenize or POST /v1/tokenize"
        )

    def score(
        self,
        sequences: Seq[SequenceLike],
        top_k: int,
        *,
        temperature: float | None = None,
        score_ids: list | None = None,
        model: str | None = None,
        logprob_dtype: schema.LogprobDtype = "float32",
        return_hidden: bool = False,
        hidden_dtype: str | None = None,
    ) -> ScoreResult:
        """Teacher scores of each sequence's completion.

        logprob_dtype="float16" halves the logprob bytes on the wire (~3 significant digits); the arrays
        returned are float32 either way. return_hidden / hidden_dtype: as HttpTeacherClient.score.
        """
        req = make_score_request(
            sequences,
            top_k,
            temperature=temperature,
            score_ids=score_ids,
            model=model,
            return_hidden=return_hidden,
            hidden_dtype=hidden_dtype,
        )
        # Not validated here: the service checks logprob_dtype and names the field (INVALID_ARGUMENT).
        req = req.model_copy(update={"logprob_dtype": logprob_dtype})
        reply = self._call("Score", convert.score_request_to_proto(req))
        return convert.score_result_from_proto(reply)

    def teacher_head(self, name: str | None = None) -> TeacherHead:
        """Teacher `name`'s output head (default: the first), fetched once with GetHead into the cache
        (opd_client.head_cache) and verified against GetInfo's head_sha256."""
        info = head_cache.head_info(self.models(), name)
        data = head_cache.cached_bytes(info)
        if data is None:
            self._download_head(info)
            data = head_cache.cached_bytes(info)
        return head_cache.load(data, info)

    def _download_head(self, info: schema.ModelInfo) -> None:
        """GetHead into the cache (HeadDownload verifies the sha256), retried like unary calls."""
        attempt = 0
        while True:
            attempt += 1
            try:
                with head_cache.HeadDownload(info) as sink:
                    request = pb.GetHeadRequest(model=info.name)
                    for chunk in self._stub.GetHead(request, metadata=self._metadata, timeout=None):
                        if chunk.offset != sink.bytes:
                            raise OpdError(f"GetHead sent offset {chunk.offset} after {sink.bytes} bytes")
                        sink.write(chunk.data)
                    sink.finish()
                    return
            except grpc.RpcError as e:
                self._wait_or_raise(_error_for_rpc(e, f"GetHead at {self.target}"), attempt, "GetHead", e)

    def chunk_score(self, request: schema.ChunkScoreRequest | dict) -> schema.ChunkScoreResponse:
        """Black-box scoring of one student completion (ChunkScore); the same answer as HTTP's."""
        req = (
            request if isinstance(request, schema.ChunkScoreRequest) else schema.ChunkScoreRequest(**request)
        )
        return convert.chunk_response_from_proto(
            self._call("ChunkScore", convert.chunk_request_to_proto(req))
        )

    def score_text(self, request: schema.ScoreTextRequest | dict) -> schema.ScoreTextResponse:
        """Scoring by text (ScoreText); the same answer as HTTP's POST /v1/score-text."""
        req = request if isinstance(request, schema.ScoreTextRequest) else schema.ScoreTextRequest(**request)
        return convert_text.response_from_proto(self._call("ScoreText", convert_text.request_to_proto(req)))

    def push_weights(
        self, weights: bytes | Path, model: str | None = None, all_tensors: bool = False
    ) -> schema.WeightsUpdate:
        """As HttpTeacherClient.push_weights, over UpdateWeights: the file in WEIGHTS_CHUNK_BYTES pieces."""
        attempt = 0
        while True:
            attempt += 1
            try:
                reply = self._stub.UpdateWeights(
                    _weights_chunks(weights, model or "", all_tensors),
                    metadata=self._metadata,
                    timeout=self.timeout,
                )
                return convert.weights_update_from_proto(reply)
            except grpc.RpcError as e:
                err = _error_for_rpc(e, f"UpdateWeights at {self.target}")
                self._wait_or_raise(err, attempt, "UpdateWeights", e)

    def reload_weights(
        self, path: str, model: str | None = None, all_tensors: bool = False
    ) -> schema.WeightsUpdate:
        """As HttpTeacherClient.reload_weights, over ReloadWeights."""
        request = pb.ReloadWeightsRequest(model=model or "", path=path, all_tensors=all_tensors)
        return convert.weights_update_from_proto(self._call("ReloadWeights", request))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GrpcTeacherClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- streaming ----------------------------------------------------------------------------------

    def score_stream(
        self, requests: Iterable[schema.ScoreRequest], timeout: float | None = None
    ) -> Iterator[tuple[int, ScoreResult | OpdError]]:
        """(index of the request, its result or its error) for each request, in the order they finish.

        Requests are read lazily, so `requests` may be a generator that produces rollouts as it goes.
        When the stream itself breaks with a retryable status, a new stream resends the requests not
        yet answered; every index is yielded exactly once. `timeout` bounds the whole stream (none by
        default: a stream may carry a whole training run).
        """
        feed = _StreamFeed(requests)
        attempt = 0
        while True:
            call = self._stub.ScoreStream(feed.open(), metadata=self._metadata, timeout=timeout)
            try:
                for answer in call:
                    index = int(answer.request_id)
                    if not feed.answered(index):
                        continue  # answered already before a reconnect
                    attempt = 0
                    yield index, _outcome(answer)
                if feed.done():
                    return
                # The server ended the stream cleanly while requests were still open: a bug, not a blip.
                raise OpdError(f"the server closed the stream with {feed.open_count()} requests unanswered")
            except grpc.RpcError as e:
                attempt += 1
                self._wait_or_raise(
                    _error_for_rpc(e, f"ScoreStream at {self.target}"), attempt, "ScoreStream", e
                )
            finally:
                call.cancel()

    # ---- plumbing -----------------------------------------------------------------------------------

    def _call(self, name: str, request):
        """One unary call (by method name) with retries; raises an OpdError."""
        method = getattr(self._stub, name)
        attempt = 0
        while True:
            attempt += 1
            try:
                return method(request, metadata=self._metadata, timeout=self.timeout)
            except grpc.RpcError as e:
                self._wait_or_raise(_error_for_rpc(e, f"{name} at {self.target}"), attempt, name, e)

    def _wait_or_raise(self, err: OpdError, attempt: int, what: str, cause: grpc.RpcError) -> None:
        """Sleep before the next try (logged), or raise err when the policy gives up."""
        if not self.retry.should_retry(err, attempt):
            raise err from cause
        delay = self.retry.delay(attempt, err.retry_after)
        logger.warning(
            "gRPC %s at %s failed (%s: %s); retry %d/%d in %.2f s",
            what,
            self.target,
            type(err).__name__,
            err.message,
            attempt,
            self.retry.max_attempts - 1,
            delay,
        )
        time.sleep(delay)


class _StreamFeed:
    """Hands requests to successive ScoreStream calls and remembers which are still unanswered.

    gRPC pulls requests on its own thread. A request is recorded as open before it is sent, and a
    reconnect resends every open request, so none is lost between two streams. The caller's iterator
    is never advanced while the state lock is held: a generator that waits for earlier results
    before yielding more (a feedback loop) must not block the thread that reads those results.
    """

    def __init__(self, requests: Iterable[schema.ScoreRequest]):
        self._source = enumerate(requests)
        self._exhausted = False
        self._open: dict[int, pb.ScoreRequest] = {}
        self._to_send: deque[int] = deque()  # open requests the current stream has not sent yet
        self._generation = 0
        self._lock = threading.Lock()  # guards the fields above
        self._pull_lock = threading.Lock()  # one stream at a time advances self._source

    def open(self) -> Iterator[pb.ScoreStreamRequest]:
        """The requests of a new stream: first the unanswered ones, then fresh ones."""
        with self._lock:
            self._generation += 1
            self._to_send = deque(sorted(self._open))
            return self._requests(self._generation)

    def _requests(self, generation: int) -> Iterator[pb.ScoreStreamRequest]:
        while True:
            with self._pull_lock:
                with self._lock:
                    if generation != self._generation:
                        return
                    index = self._to_send.popleft() if self._to_send else None
                    if index is None and self._exhausted:
                        return
                    msg = self._open.get(index) if index is not None else None
                if msg is None:
                    pulled = self._pull()
                    with self._lock:
                        if pulled is None:
                            self._exhausted = True
                            return
                        index, msg = pulled
                        self._open[index] = msg
                        if generation != self._generation:
                            self._to_send.append(index)  # reconnected meanwhile: the new stream sends it
                            return
            yield pb.ScoreStreamRequest(request_id=str(index), request=msg)

    def _pull(self) -> tuple[int, pb.ScoreRequest] | None:
        """The caller's next request (advanced without the state lock), or None at the end."""
        try:
            index, req = next(self._source)
        except StopIteration:
            return None
        return index, convert.score_request_to_proto(req)

    def answered(self, index: int) -> bool:
        """Mark index answered; False when it was not open (a duplicate after a reconnect)."""
        with self._lock:
            return self._open.pop(index, None) is not None

    def done(self) -> bool:
        with self._lock:
            return self._exhausted and not self._open

    def open_count(self) -> int:
        with self._lock:
            return len(self._open)


def _weights_chunks(weights: bytes | Path, model: str, all_tensors: bool) -> Iterator[pb.WeightsChunk]:
    """A safetensors file as UpdateWeights chunks (the model and all_tensors in the first), made anew per
    attempt."""
    first = pb.WeightsChunk(model=model, all_tensors=all_tensors)
    if isinstance(weights, bytes):
        for start in range(0, max(1, len(weights)), WEIGHTS_CHUNK_BYTES):
            piece = weights[start : start + WEIGHTS_CHUNK_BYTES]
            yield pb.WeightsChunk(data=piece) if start else _with_data(first, piece)
        return
    with open(weights, "rb") as f:
        piece = f.read(WEIGHTS_CHUNK_BYTES)
        yield _with_data(first, piece)
        while piece := f.read(WEIGHTS_CHUNK_BYTES):
            yield pb.WeightsChunk(data=piece)


def _with_data(chunk: pb.WeightsChunk, data: bytes) -> pb.WeightsChunk:
    chunk.data = data
    return chunk


def _open_channel(target: str | Seq[str]) -> grpc.Channel:
    """A channel to one teacher, several ("host:port,host:port" or a list), or every address of a name;
    calls go round-robin over the replicas that are up (opd_client.endpoints.grpc_target)."""
    secure = isinstance(target, str) and target.startswith("grpcs://")
    if isinstance(target, str):
        target = target.removeprefix("grpcs://").removeprefix("grpc://")
    address, options = grpc_target(target)
    options += [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    if secure:
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(), options)
    return grpc.insecure_channel(address, options)


def _outcome(answer: pb.ScoreStreamResponse) -> ScoreResult | OpdError:
    if answer.WhichOneof("outcome") == "response":
        return convert.score_result_from_proto(answer.response)
    e = answer.error
    err = error_for_grpc(_CODE_NAMES.get(e.grpc_code, "UNKNOWN"), e.message, field=e.field or None)
    err.http_status = e.http_status or err.http_status
    return err


def _error_for_rpc(e: grpc.RpcError, where: str) -> OpdError:
    """The opd error for a failed call, with the field and retry-after the server put in its trailers."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else None) or str(e)
    trailers = dict(e.trailing_metadata() or ()) if hasattr(e, "trailing_metadata") else {}
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        # gRPC's own message-size limit: resending the same request can never fit, so do not retry.
        return TooManyTokens(
            f"{where}: {details}; lower top_k or send fewer tokens per request", field="top_k"
        )
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not trailers:
        # Raised by the channel itself (refused, reset, timed out), so say where it was going.
        details = f"{where}: {details}"
    return error_for_grpc(
        code.name,
        details,
        field=trailers.get("opd-field"),
        retry_after=parse_retry_after(trailers.get("retry-after")),
    )
