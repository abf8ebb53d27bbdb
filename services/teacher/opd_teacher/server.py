"""Run the teacher service: HTTP (uvicorn) and gRPC in one asyncio loop over one engine.

The ports open before the weights load, so orchestrators see the process live (and not yet ready) at
once; on SIGTERM/SIGINT the service reports not-ready, lets in-flight requests finish, then exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import uvicorn

from opd_teacher.backends.base import Backend
from opd_teacher.batcher import BatchLimits
from opd_teacher.engine import TeacherEngine
from opd_teacher.http.app import create_app
from opd_teacher.weight_updates import WeightLimits

log = logging.getLogger("opd_teacher")
HTTP_FLUSH_S = 5  # seconds after the drain for uvicorn to write the last responses and close (an int)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int | None = 50051  # None: no gRPC
    api_keys: set[str] = field(default_factory=set)
    drain_timeout_s: float = 30.0
    batch: BatchLimits = field(default_factory=BatchLimits)
    weights: WeightLimits = field(default_factory=WeightLimits)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: this module decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def serve(config: ServerConfig, loaders: dict[str, Callable[[], Backend]]) -> None:
    engine = TeacherEngine(config.batch, config.weights)
    http = _Uvicorn(
        uvicorn.Config(
            create_app(engine, config.api_keys),
            host=config.host,
            port=config.port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=HTTP_FLUSH_S,
        )
    )
    grpc_server = None
    if config.grpc_port is not None:
        from opd_teacher.grpc_server import build_grpc_server

        # gRPC health reads engine.ready, so it flips with loading and draining by itself.
        grpc_server = build_grpc_server(engine, config.host, config.grpc_port, config.api_keys or None)
        await grpc_server.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    http_task = asyncio.create_task(http.serve())
    grpc_note = f", gRPC on {config.host}:{config.grpc_port}" if grpc_server else ""
    log.info(
        "listening: HTTP on http://%s:%d%s (not ready until weights load)",
        config.host,
        config.port,
        grpc_note,
    )
    load_task = asyncio.create_task(_load(engine, loaders))
    await asyncio.wait(
        [asyncio.create_task(stop.wait()), http_task, load_task], return_when=asyncio.FIRST_COMPLETED
    )
    if load_task.done() and load_task.exception() is not None:
        log.error("loading failed: %s", load_task.exception())
        stop.set()
    if not stop.is_set() and not http_task.done():
        await asyncio.wait([asyncio.create_task(stop.wait()), http_task], return_when=asyncio.FIRST_COMPLETED)

    log.info("draining: not ready, finishing in-flight requests (up to %.0f s)", config.drain_timeout_s)
    engine.draining = True
    await _drain(engine, http, http_task, grpc_server, config.drain_timeout_s)
    load_task.cancel()
    await engine.close()
    log.info("stopped")
    if load_task.done() and not load_task.cancelled() and load_task.exception() is not None:
        raise SystemExit(f"error: {load_task.exception()}")


async def _drain(engine: TeacherEngine, http: _Uvicorn, http_task, grpc_server, timeout_s: float) -> None:
    """Finish the work in flight within timeout_s, then close both faces.

    HTTP keeps listening meanwhile, so health checks answer 503 "draining" and new requests 503 with
    Retry-After (clients fail over) instead of meeting a closed port; gRPC refuses new calls at once.
    """
    deadline = time.monotonic() + timeout_s
    stopping = [http_task]
    if grpc_server is not None:
        stopping.append(asyncio.create_task(grpc_server.stop(grace=timeout_s)))
    while engine.active and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if engine.active:
        log.warning("drain timeout: %d requests still in flight are cut off", engine.active)
    http.should_exit = True  # uvicorn flushes the last responses (HTTP_FLUSH_S at most)
    await asyncio.gather(*stopping)


async def _load(engine: TeacherEngine, loaders: dict[str, Callable[[], Backend]]) -> None:
    for name, load in loaders.items():
        started = time.perf_counter()
        backend = await asyncio.to_thread(load)
        await asyncio.to_thread(backend.warm_up)  # before it takes requests
        engine.add_backend(name, backend)
        info = backend.info
        log.info(
            "loaded %s in %.1f s (%s, %s, vocab %d, max_top_k %d)",
            name,
            time.perf_counter() - started,
            info.dtype,
            info.device,
            info.vocab_size,
            info.max_top_k,
        )
    engine.loaded = True
    log.info("ready")
