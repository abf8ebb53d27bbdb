"""The teacher engine: models by name, request validation, and the batchers that feed the forwards.

Both faces (HTTP, gRPC) call into this one object, so validation, metrics and scheduling are shared.
Each model has a Batcher; all forwards run on a single worker thread, off the event loop: on CPU one
forward already uses every core, and on GPU one stream at a time keeps memory predictable. Generations
(the OpenAI-compatible endpoints) use the same thread one decode step at a time, between score batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from opd_client import schema
from opd_client.errors import Forbidden, InvalidRequest, NotFound, Overloaded, Unavailable
from opd_client.scores import ScoreResult
from opd_teacher import metrics
from opd_teacher.backends.base import Backend
from opd_teacher.batcher import Batcher, BatchLimits
from opd_teacher.validate import hidden_dtype, validate_score_request
from opd_teacher.weight_updates import WeightLimits, body_limit

if TYPE_CHECKING:  # generate and live_weights import torch; the engine itself does not need it
    from opd_teacher.backends.generate import Sample, SamplingParams
    from opd_teacher.backends.live_weights import LiveWeights, StagedWeights


log = logging.getLogger(__name__)

# Generations waiting for their turn (or running) beyond which new ones are refused (429): they run one at
# a time, so a longer queue only adds latency.
MAX_WAITING_GENERATIONS = 64


def _run_batch(name: str, backend: Backend, key: tuple[int, float, bool], items: list) -> list:
    """One batch on the forward thread. The key is (top_k, temperature, ranks): a forward scores all alike.

    Each result comes with the weights version it was computed with: read here, on the thread where
    updates are applied, so no update can fall inside the batch."""
    top_k, temperature, ranks = key
    weights = getattr(backend, "weights", None)
    version = weights.version if weights is not None else None
    if ranks:  # only the OpenAI endpoints' prompt_logprobs ask for ranks (an extra pass over the logits)
        results = backend.score(items, top_k, temperature, ranks=True)
    else:
        results = backend.score(items, top_k, temperature)
    metrics.FORWARD_TOKENS.labels(name).inc(backend.last_forward_tokens)
    return [(version, scores) for scores in results]


def _apply_weights(backend: Backend, staged: StagedWeights) -> tuple[int, float]:
    """On the forward thread, between two batches: the new weights, the served head and the model's record
    change together. (new version, seconds the forwards waited)."""
    started = time.perf_counter()
    weights: LiveWeights = backend.weights  # type: ignore[attr-defined]
    version = weights.apply(staged)
    update: dict = {"weights_version": version}
    if staged.head is not None:
        backend.head = staged.head
        update["head_sha256"] = staged.head.sha256
    backend.info = backend.info.model_copy(update=update)
    return version, time.perf_counter() - started


class TeacherEngine:
    """Starts empty so the service can answer health checks while weights load; add_backend() fills it."""

    def __init__(self, limits: BatchLimits | None = None, weight_limits: WeightLimits | None = None) -> None:
        self.backends: dict[str, Backend] = {}
        self.batchers: dict[str, Batcher] = {}
        self.limits = limits or BatchLimits()
        self.weight_limits = weight_limits or WeightLimits()
        self._weights_turn = asyncio.Lock()  # one weight update at a time
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-forward")
        self.loaded = False
        self.draining = False
        self.active = 0  # score / generate / chunk-score calls in progress: the drain waits for 0
        self._waiting_generations = 0
        self._generation_turn = asyncio.Lock()

    @contextlib.contextmanager
    def _working(self):
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    @property
    def ready(self) -> bool:
        return self.loaded and not self.draining

    @property
    def default_name(self) -> str:
        return next(iter(self.backends))

    def add_backend(self, name: str, backend: Backend) -> None:
        if name in self.backends:
            raise ValueError(f"two teachers are named {name!r}; give each --model a distinct ALIAS=")
        weights = getattr(backend, "weights", None)
        if weights is not None:  # a white-box model: its record says which weights it serves
            updates = self.weight_limits.weight_updates
            limit = body_limit(self.weight_limits, weights.nbytes) if updates else None
            backend.info = backend.info.model_copy(
                update={"weights_version": weights.version, "max_weights_bytes": limit}
            )
            metrics.WEIGHTS_VERSION.labels(name).set(weights.version)
        self.backends[name] = backend
        self.batchers[name] = Batcher(name, partial(_run_batch, name, backend), self._executor, self.limits)

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

    async def score(
        self, req: schema.ScoreRequest, deadline: float | None = None, ranks: bool = False
    ) -> ScoreResult:
        """Scores for a request; `deadline` (time.monotonic()) drops it unstarted once passed.

        With `ranks`, each sequence also carries token_rank_T (see backends.hf.RankedScores); such requests
        batch only with each other, so /v1/score batches never pay for the ranks.
        """
        with self._working():
            return await self._score(req, deadline, ranks)

    async def _score(self, req: schema.ScoreRequest, deadline: float | None, ranks: bool) -> ScoreResult:
        started = time.perf_counter()
        backend = self.backend(req.model)
        name = backend.info.name
        if backend.info.black_box:
            raise InvalidRequest(
                f"teacher {name!r} is black-box (an OpenAI-compatible chat API): it has no logprobs of given "
                "tokens; score it with POST /v1/chunk-score (train with --loss chunk)",
                field="model",
            )
        items, top_k, temperature = validate_score_request(req, backend.info, backend.bos_token_id)
        forward = sum(it.forward_len for it in items)
        metrics.INFLIGHT.labels(name).inc()
        try:
            results = await self.batchers[name].submit((top_k, temperature, ranks), items, forward, deadline)
        finally:
            metrics.INFLIGHT.labels(name).dec()
        # One job runs in one batch, so all its results share one version.
        sequences = [scores for _, scores in results]
        version = results[0][0] if results else None
        metrics.SCORE_SECONDS.labels(name).observe(time.perf_counter() - started)
        scored = sum(len(it.completion_ids) for it in items)
        metrics.SCORED_TOKENS.labels(name).inc(scored)
        return ScoreResult(
            model=name,
            sequences=sequences,
            scored_tokens=scored,
            forward_tokens=forward,
            hidden_dtype=hidden_dtype(req, backend.info),  # the faces encode hidden_T_D in it
            weights_version=version,
        )

    # ---- live weight updates (weight_updates.py, backends/live_weights.py) --------------------------------

    def weights_body_limit(self, name: str | None) -> int:
        """The most bytes a push to `name` may hold; refuses (404, 403, 400) before any byte is read."""
        backend = self.backend(name)
        if not self.weight_limits.weight_updates:
            raise Forbidden(
                "live weight updates are off on this service; start it with --weight-updates", field="name"
            )
        weights = getattr(backend, "weights", None)
        if weights is None:
            raise InvalidRequest(
                f"teacher {backend.info.name!r} has no weights here to update (a black-box API teacher)",
                field="name",
            )
        return body_limit(self.weight_limits, weights.nbytes)

    async def update_weights(
        self, name: str | None, files: list[Path], source: str, field: str, all_tensors: bool = False
    ) -> schema.WeightsUpdate:
        """Replace `name`'s weights with the tensors in `files`: checked and read while forwards go on, then
        swapped on the forward thread between two batches (and never during a generation, which would mix
        two versions in one answer). A refused update changes nothing."""
        self.weights_body_limit(name)
        backend = self.backend(name)
        weights: LiveWeights = backend.weights  # type: ignore[attr-defined]
        model = backend.info.name
        with self._working():
            async with self._weights_turn:
                try:
                    staged = await asyncio.to_thread(weights.stage, files, source, field, all_tensors)
                except Exception as e:
                    metrics.WEIGHT_UPDATES.labels(model, "refused").inc()
                    log.warning("%s: weight update from %s refused: %s", model, source, e)
                    raise
                previous = weights.version
                loop = asyncio.get_running_loop()
                async with self._generation_turn:
                    version, swap_s = await loop.run_in_executor(
                        self._executor, _apply_weights, backend, staged
                    )
        metrics.WEIGHT_UPDATES.labels(model, "applied").inc()
        metrics.WEIGHTS_VERSION.labels(model).set(version)
        log.info(
            "%s: weights version %d from %s (%d tensors, %.1f MB; read and checked in %.2f s, swapped in %.3f s)",
            model,
            version,
            source,
            len(staged.names),
            staged.nbytes / 1e6,
            staged.load_s,
            swap_s,
        )
        return schema.WeightsUpdate(
            model=model,
            weights_version=version,
            previous_version=previous,
            tensors=len(staged.names),
            bytes=staged.nbytes,
            source=source,
            load_s=staged.load_s,
            swap_s=swap_s,
        )

    async def generate(self, name: str, prompt_ids: list[int], params: SamplingParams) -> list[Sample]:
        """params.n samples continuing prompt_ids (validated by the caller).

        Generations take turns, one at a time (each holds a KV cache for its samples). The running one hands
        the forward thread one decode step at a time, so score batches queued meanwhile run between two of
        its steps: a score request waits for at most one step, however long the generation. Cancelling the
        caller stops the decode before its next step.
        """
        backend = self.backend(name)
        if self._waiting_generations >= MAX_WAITING_GENERATIONS:
            raise Overloaded(
                f"{self._waiting_generations} generations are waiting for the teacher (limit "
                f"{MAX_WAITING_GENERATIONS}); retry later",
                retry_after=5,
            )
        loop = asyncio.get_running_loop()
        self._waiting_generations += 1
        try:
            with self._working():
                async with self._generation_turn:
                    generation = backend.start_generation(prompt_ids, params)
                    tokens = 0
                    done = False
                    while not done:
                        done = await loop.run_in_executor(self._executor, generation.step)
                        now = sum(len(s.token_ids) for s in generation.samples)
                        metrics.GENERATED_TOKENS.labels(name).inc(now - tokens)
                        tokens = now
                    return generation.samples
        finally:
            self._waiting_generations -= 1

    async def chunk_score(self, req: schema.ChunkScoreRequest) -> schema.ChunkScoreResponse:
        """Black-box scoring (opd_teacher.blackbox.chunk_scorer): the teacher's API is called, not the forward thread."""
        from opd_teacher.blackbox.backend import BlackBoxBackend
        from opd_teacher.blackbox.chunk_scorer import chunk_score

        backend = self.backend(req.model)
        if not isinstance(backend, BlackBoxBackend):  # the one backend whose info says black_box
            raise InvalidRequest(
                f"teacher {backend.info.name!r} is white-box: score it with POST /v1/score; chunk scoring "
                "needs a teacher served with --backend openai",
                field="model",
            )
        with self._working():
            return await chunk_score(backend, req)

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
            assert req.text is not None, "exactly one of text and messages (checked above)"
            text = req.text
            ids = backend.tokenize_text(text, add_special_tokens=req.add_special_tokens)
        return schema.TokenizeResponse(model=backend.info.name, token_ids=ids, text=text)

    async def close(self) -> None:
        """After the faces stopped: end the batch loops and wait for a forward still running."""
        for batcher in self.batchers.values():
            await batcher.close()
        self._executor.shutdown(wait=True, cancel_futures=False)
