"""The gRPC face of the teacher: `opd.v1.Teacher`, `grpc.health.v1` and API-key auth on one aio server.

Requests take the same path as HTTP: proto -> opd_client.convert -> TeacherEngine -> convert -> proto, so
validation and limits live in the engine and only the status mapping lives here (OpdError.grpc_code).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from opd_client import convert, convert_text
from opd_client.errors import InvalidRequest, NotFound, OpdError, TooManyTokens, Unavailable
from opd_client.grpc_client import MAX_MESSAGE_BYTES
from opd_client.v1 import teacher_pb2 as pb
from opd_client.v1 import teacher_pb2_grpc as pb_grpc
from opd_teacher import metrics
from opd_teacher.engine import TeacherEngine
from opd_teacher.pydantic_errors import validation_failed
from opd_teacher.text_scoring import score_text
from opd_teacher.weight_updates import WeightsSpool, reload_files

log = logging.getLogger(__name__)

TEACHER_SERVICE = pb.DESCRIPTOR.services_by_name["Teacher"].full_name  # "opd.v1.Teacher"
HEALTH_PREFIX = f"/{health_pb2.DESCRIPTOR.services_by_name['Health'].full_name}/"
STREAM_IN_FLIGHT = 64  # score requests per stream being run or waiting to be written
NOT_READY_RETRY_AFTER_S = 2.0
WATCH_POLL_S = 0.5
_RESPONSE_SLACK_BYTES = 1024  # the ScoreStreamResponse wrapper around a ScoreResponse
# GetHead's pieces: under gRPC's default 4 MiB message limit (third-party clients keep it), with room for
# the HeadChunk fields around the bytes.
HEAD_CHUNK_BYTES = 2 * 2**20


def build_grpc_server(
    engine: TeacherEngine, host: str, port: int, api_keys: set[str] | None
) -> grpc.aio.Server:
    """An aio server with the teacher and health services, its port bound but not started.

    `server.opd_port` holds the bound port (useful with port 0); `set_not_serving(server)` flips health.
    """
    interceptors = [ApiKeyInterceptor(api_keys)] if api_keys else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            # top_k = vocab responses are large: 49152 ids + logprobs is ~390 KB per scored position.
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # gRPC sets SO_REUSEPORT by default, so a second server on a busy port would bind silently.
            ("grpc.so_reuseport", 0),
        ],
    )
    health = EngineHealth(engine)
    pb_grpc.add_TeacherServicer_to_server(TeacherServicer(engine), server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.opd_health = health
    server.opd_port = server.add_insecure_port(f"{host}:{port}")
    return server


def set_not_serving(server: grpc.aio.Server) -> None:
    """For the drain code: from now on every health check answers NOT_SERVING."""
    server.opd_health.shutting_down = True


# ---- the teacher service ------------------------------------------------------------------------------


class TeacherServicer(pb_grpc.TeacherServicer):
    def __init__(self, engine: TeacherEngine):
        self.engine = engine

    async def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetInfoResponse:
        async def info() -> pb.GetInfoResponse:
            if not self.engine.loaded:
                raise Unavailable(
                    "the teacher is still loading its weights", retry_after=NOT_READY_RETRY_AFTER_S
                )
            return pb.GetInfoResponse(models=[convert.model_info_to_proto(i) for i in self.engine.infos()])

        return await _unary("GetInfo", context, info)

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        return await _unary("Score", context, lambda: self._score(request, context))

    async def ChunkScore(
        self, request: pb.ChunkScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ChunkScoreResponse:
        async def chunk_score() -> pb.ChunkScoreResponse:
            try:
                req = convert.chunk_request_from_proto(request)
            except ValidationError as e:
                raise validation_failed(e.errors()) from e
            return convert.chunk_response_to_proto(await self.engine.chunk_score(req))

        return await _unary("ChunkScore", context, chunk_score)

    async def ScoreText(
        self, request: pb.ScoreTextRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreTextResponse:
        async def score() -> pb.ScoreTextResponse:
            try:
                req = convert_text.request_from_proto(request)
            except ValidationError as e:
                raise validation_failed(e.errors()) from e
            return convert_text.response_to_proto(await score_text(self.engine, req, _deadline(context)))

        return await _unary("ScoreText", context, score)

    async def GetHead(
        self, request: pb.GetHeadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.HeadChunk]:
        """The head's safetensors bytes in chunks under gRPC's default 4 MiB message limit."""
        started = time.perf_counter()
        try:
            backend = self.engine.backend(request.model or None)
            export = backend.head
            if export is None:
                raise NotFound(
                    f"teacher {backend.info.name!r} serves no output head (black-box, or its logits are "
                    "not the head formula: see hidden_size in GetInfo and the service's log)",
                    field="model",
                )
        except Exception as e:  # noqa: BLE001 - mapped to a status; the server keeps serving
            err = _as_opd_error(e, "GetHead")
            _observe("GetHead", err.grpc_code, started)
            await context.abort(_status_code(err), err.message, trailing_metadata=_trailing_metadata(err))
            return  # abort() raises; this says so to the type checker (grpc is untyped)
        name, total = backend.info.name, len(export.data)
        for offset, data in export.chunks(HEAD_CHUNK_BYTES):
            yield pb.HeadChunk(model=name, sha256=export.sha256, total_bytes=total, offset=offset, data=data)
        _observe("GetHead", "OK", started)

    async def UpdateWeights(
        self, request_iterator: AsyncIterator[pb.WeightsChunk], context: grpc.aio.ServicerContext
    ) -> pb.WeightsUpdate:
        """HTTP's PUT /v1/models/{name}/weights: the chunks spooled to disk, then engine.update_weights."""

        async def update() -> pb.WeightsUpdate:
            chunks = request_iterator.__aiter__()
            first = await anext(chunks, None)
            if first is None:
                raise InvalidRequest("UpdateWeights got no chunks; send the safetensors bytes", field="data")
            name = first.model or None
            limit = self.engine.weights_body_limit(name)
            with WeightsSpool(limit, self.engine.weight_limits.weights_spool_dir) as spool:
                await spool.write(first.data)
                async for chunk in chunks:
                    await spool.write(chunk.data)
                path = await spool.finish()
                update = await self.engine.update_weights(name, [path], "push", "data", first.all_tensors)
            return convert.weights_update_to_proto(update)

        return await _unary("UpdateWeights", context, update)

    async def ReloadWeights(
        self, request: pb.ReloadWeightsRequest, context: grpc.aio.ServicerContext
    ) -> pb.WeightsUpdate:
        async def reload() -> pb.WeightsUpdate:
            name = request.model or None
            self.engine.weights_body_limit(name)
            files = reload_files(request.path, self.engine.weight_limits.reload_root)
            update = await self.engine.update_weights(name, files, request.path, "path", request.all_tensors)
            return convert.weights_update_to_proto(update)

        return await _unary("ReloadWeights", context, reload)

    async def ScoreStream(
        self, request_iterator: AsyncIterator[pb.ScoreStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreStreamResponse]:
        """Items run concurrently and are answered as they finish; an item's error is its answer.

        A slot is freed only when its answer has been written, so a client that stops reading holds
        at most STREAM_IN_FLIGHT answers in server memory.
        """
        slots = asyncio.Semaphore(STREAM_IN_FLIGHT)
        answers: asyncio.Queue[pb.ScoreStreamResponse | None] = asyncio.Queue()
        reader = asyncio.create_task(self._run_stream_items(request_iterator, slots, answers, context))
        try:
            while (answer := await answers.get()) is not None:
                yield answer
                slots.release()
            await reader  # re-raise what ended the reader early, if anything
        finally:
            reader.cancel()

    async def _run_stream_items(
        self,
        request_iterator: AsyncIterator[pb.ScoreStreamRequest],
        slots: asyncio.Semaphore,
        answers: asyncio.Queue,
        context: grpc.aio.ServicerContext,
    ) -> None:
        tasks: set[asyncio.Task] = set()
        try:
            async for item in request_iterator:
                await slots.acquire()
                task = asyncio.create_task(self._stream_item(item, answers, context))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            answers.put_nowait(None)

    async def _stream_item(
        self, item: pb.ScoreStreamRequest, answers: asyncio.Queue, context: grpc.aio.ServicerContext
    ) -> None:
        started = time.perf_counter()
        try:
            response = await self._score(item.request, context)
            answer = pb.ScoreStreamResponse(request_id=item.request_id, response=response)
            code = "OK"
        except Exception as e:  # noqa: BLE001 - every failure of one item is that item's answer
            err = _as_opd_error(e, "ScoreStream")
            answer = pb.ScoreStreamResponse(request_id=item.request_id, error=_error_to_proto(err))
            code = err.grpc_code
        _observe("ScoreStream", code, started)
        await answers.put(answer)

    async def _score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        try:
            req = convert.score_request_from_proto(request)
        except ValidationError as e:
            raise validation_failed(e.errors()) from e
        result = await self.engine.score(req, _deadline(context))
        response = convert.score_result_to_proto(result, req.logprob_dtype)
        size = response.ByteSize()
        if size > MAX_MESSAGE_BYTES - _RESPONSE_SLACK_BYTES:
            raise TooManyTokens(
                f"the response would be {size / 2**20:.0f} MiB, above the gRPC message limit of "
                f"{MAX_MESSAGE_BYTES >> 20} MiB; lower top_k or send fewer tokens per request "
                "(or logprob_dtype=float16, or HTTP with Accept: application/x-protobuf)",
                field="top_k",
            )
        return response


async def _unary(method: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable]):
    """Run one unary call; an error becomes its status code, message and trailing metadata."""
    started = time.perf_counter()
    try:
        response = await work()
    except Exception as e:  # noqa: BLE001 - mapped to a status below; the server keeps serving
        err = _as_opd_error(e, method)
        _observe(method, err.grpc_code, started)
        await context.abort(_status_code(err), err.message, trailing_metadata=_trailing_metadata(err))
    _observe(method, "OK", started)
    return response


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on time.monotonic()'s clock (None without one), for dropping queued work."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _as_opd_error(e: Exception, method: str) -> OpdError:
    if isinstance(e, OpdError):
        return e
    if isinstance(e, ValidationError):
        return validation_failed(e.errors())
    log.exception("unexpected error in %s", method)
    return OpdError(f"internal error in {method}: {type(e).__name__}: {e}")


def _status_code(err: OpdError) -> grpc.StatusCode:
    return grpc.StatusCode[err.grpc_code]


def _trailing_metadata(err: OpdError) -> tuple[tuple[str, str], ...]:
    metadata = []
    if err.field:
        metadata.append(("opd-field", err.field))
    if err.retry_after is not None:
        metadata.append(("retry-after", f"{err.retry_after:g}"))
    return tuple(metadata)


def _error_to_proto(err: OpdError) -> pb.Error:
    return pb.Error(
        grpc_code=_status_code(err).value[0],
        http_status=err.http_status,
        field=err.field or "",
        message=err.message,
    )


def _observe(method: str, code: str, started: float) -> None:
    endpoint = f"grpc:{method}"
    metrics.REQUESTS.labels(endpoint, code).inc()
    metrics.REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - started)


# ---- health -------------------------------------------------------------------------------------------


class EngineHealth(health_pb2_grpc.HealthServicer):
    """grpc.health.v1 read from the engine's state, so it can never disagree with it.

    SERVING for "" and opd.v1.Teacher once the engine is ready; NOT_SERVING while loading, while the
    engine drains, or after set_not_serving().
    """

    SERVICES = ("", TEACHER_SERVICE)

    def __init__(self, engine: TeacherEngine):
        self.engine = engine
        self.shutting_down = False

    def status(self, service: str) -> int | None:
        if service not in self.SERVICES:
            return None
        serving = self.engine.ready and not self.shutting_down  # ready is False while draining
        return (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def Check(self, request, context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        status = self.status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def List(self, request, context: grpc.aio.ServicerContext) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={s: health_pb2.HealthCheckResponse(status=self.status(s)) for s in self.SERVICES}
        )

    async def Watch(self, request, context: grpc.aio.ServicerContext) -> AsyncIterator:
        # Polls (the engine has no change events); the loop ends when the client cancels the call.
        last = None
        while True:
            status = self.status(request.service)
            if status is None:
                status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(WATCH_POLL_S)


# ---- auth ---------------------------------------------------------------------------------------------


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Every method but the health service needs `authorization: Bearer KEY` metadata."""

    def __init__(self, api_keys: set[str]):
        self._keys = [k.encode() for k in api_keys]

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        problem = self._problem(dict(details.invocation_metadata or ()).get("authorization"))
        if problem is None:
            return handler
        _observe(details.method.rsplit("/", 1)[-1], "UNAUTHENTICATED", time.perf_counter())
        return _denying_handler(handler, problem)

    def _problem(self, header: str | None) -> str | None:
        """Why the call is refused, or None when the key is right."""
        if header is None:
            return "missing authorization metadata: send 'authorization: Bearer <API key>'"
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            return "malformed authorization metadata: expected 'Bearer <API key>'"
        # Compare against every key without stopping early, so timing says nothing about which matched.
        matched = False
        for known in self._keys:
            matched |= hmac.compare_digest(key.strip().encode(), known)
        return None if matched else "wrong API key"


def _denying_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that fails with UNAUTHENTICATED."""

    async def deny(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(
        deny,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
