"""The teacher engine: models by name, request validation, and the worker that runs forwards.

Both faces (HTTP, gRPC) call into this one object, so validation, metrics and scheduling are shared.
Forwards run on a single worker thread, off the event loop: on CPU one forward already uses every core,
and on GPU one stream at a time keeps memory predictable.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from opd_client import schema
from opd_client.errors import InvalidRequest, NotFound, Unavailable
from opd_client.scores import ScoreResult
from opd_teacher import metrics
from opd_teacher.backends.base import Backend
from opd_teacher.validate import validate_score_request


class TeacherEngine:
    """Starts empty so the service can answer health checks while weights load; add_backend() fills it."""

    def __init__(self) -> None:
        self.backends: dict[str, Backend] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-forward")
        self.loaded = False
        self.draining = False

    @property
    def ready(self) -> bool:
        return self.loaded and not self.draining

    @property
    def default_name(self) -> str:
        return next(iter(self.backends))

    def add_backend(self, name: str, backend: Backend) -> None:
        if name in self.backends:
            raise ValueError(f"two teachers are named {name!r}; give each --model a distinct ALIAS=")
        self.backends[name] = backend

    def backend(self, name: str | None) -> Backend:
        if self.draining:
            raise Unavailable("the teacher is shutting down; retry on another replica", retry_after=1)
        if not self.loaded:
            raise Unavailable("the teacher is still loading its weights", retry_after=2)
        name = name or self.default_name
        if name not in self.backends:
            raise NotFound(
                f"model {name!r} is not served here; available: {', '.join(self.backends)}", field="model"
            )
        return self.backends[name]

    def infos(self) -> list[schema.ModelInfo]:
        return [b.info for b in self.backends.values()]

    async def score(self, req: schema.ScoreRequest) -> ScoreResult:
        backend = self.backend(req.model)
        name = backend.info.name
        items, top_k, temperature = validate_score_request(req, backend.info, backend.bos_token_id)
        metrics.INFLIGHT.labels(name).inc()
        try:
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            sequences = await loop.run_in_executor(self._executor, backend.score, items, top_k, temperature)
            metrics.FORWARD_SECONDS.labels(name).observe(time.perf_counter() - started)
        finally:
            metrics.INFLIGHT.labels(name).dec()
        scored = sum(len(it.completion_ids) for it in items)
        forward = sum(it.forward_len for it in items)
        metrics.SCORED_TOKENS.labels(name).inc(scored)
        metrics.FORWARD_TOKENS.labels(name).inc(forward)
        return ScoreResult(model=name, sequences=sequences, scored_tokens=scored, forward_tokens=forward)

    def tokenize(self, req: schema.TokenizeRequest) -> schema.TokenizeResponse:
        backend = self.backend(req.model)
        if (req.text is None) == (req.messages is None):
            raise InvalidRequest("send exactly one of text or messages", field="text")
        if req.messages is not None:
            if not req.messages:
                raise InvalidRequest("messages is empty; send at least 1 message", field="messages")
            try:
                text = backend.render_chat([m.model_dump() for m in req.messages], req.add_generation_prompt)
            except ValueError as e:
                raise InvalidRequest(str(e), field="messages") from e
            ids = backend.tokenize_text(text, add_special_tokens=False)
        else:
            text = req.text
            ids = backend.tokenize_text(text, add_special_tokens=req.add_special_tokens)
        return schema.TokenizeResponse(model=backend.info.name, token_ids=ids, text=text)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
