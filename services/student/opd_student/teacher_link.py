"""The trainer's connection to the teacher service: start-up checks, pipelined scoring, outage handling.

Scoring requests run on a small thread pool, so the next batch can be generated while the teacher scores
the current one. When the teacher becomes unreachable, the step waits (with backoff) and resends the
same requests: a step is taken only with its scores, so none is lost or repeated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from opd_client.errors import InvalidRequest, NotFound, OpdError, Unauthenticated
from opd_client.http_client import HttpTeacherClient
from opd_client.request_split import split_requests, teacher_view_len
from opd_client.retry import RetryPolicy
from opd_client.schema import ChunkScoreRequest, ModelInfo, ScoreTextRequest
from opd_client.tokenizer_hash import tokenizer_sha256
from opd_student.rollouts import Rollout

log = logging.getLogger(__name__)

# Errors that retrying cannot fix: a bug or a misconfiguration, reported at once.
FATAL = (InvalidRequest, NotFound, Unauthenticated)


class TeacherUnreachable(RuntimeError):
    pass


@dataclass
class Pending:
    """n requests in flight: futures resolving to (indices, answers), and how to resend some of them."""

    n: int
    futures: list[Future]
    resend: Callable[[list[int]], list[Future]]
    versions: set[int] = field(default_factory=set)  # the teacher weights_version of each answer so far


class TeacherLink:
    def __init__(
        self,
        url: str,
        api_key: str | None,
        timeout_s: float,
        max_inflight: int,
        wait_s: float,
        on_wait=None,
        first_replica: int = 0,
    ):
        # The client's own retries ride out short blips and fail over between replicas; this class
        # handles outages longer than those. Trainer ranks start their round-robin at their rank.
        try:
            self.client = HttpTeacherClient(
                url,
                api_key=api_key,
                timeout=timeout_s,
                retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.5, max_backoff_s=5),
                first_replica=first_replica,
            )
        except ValueError as e:
            raise SystemExit(f"error: --teacher-url: {e}") from e
        self.url = url
        self.wait_s = wait_s
        self.on_wait = on_wait or (lambda message: log.warning(message))
        self._pool = ThreadPoolExecutor(max_workers=max_inflight, thread_name_prefix="opd-score")
        # Checked teachers' records by the name rollouts use (None: the default); their limits cut requests.
        self._infos: dict[str | None, ModelInfo] = {}
        # The teacher weights versions that answered the last collect() (live-updated teachers).
        self.last_versions: list[int] = []
        # Checked teachers whose tokenizer differs from the student's (only allowed for cross-tokenizer runs).
        self.other_tokenizer: dict[str | None, bool] = {}

    def check(self, tokenizer, teacher_model: str | None, allow_other_tokenizer: bool = False) -> ModelInfo:
        """The teacher's model info; a clear error for a wrong URL, key, name or tokenizer (a teacher with
        another tokenizer only with allow_other_tokenizer: cross-tokenizer distillation scores text)."""
        try:
            infos = self.client.models()
        except Unauthenticated as e:
            raise SystemExit(f"error: the teacher at {self.url} refused the API key: {e.message}") from e
        except OpdError as e:
            raise SystemExit(f"error: cannot reach a teacher service at {self.url}: {e.message}") from e
        by_name = {i.name: i for i in infos}
        info = by_name.get(teacher_model) if teacher_model else infos[0]
        if info is None:
            raise SystemExit(
                f"error: the teacher service at {self.url} has no model {teacher_model!r}; "
                f"it serves {', '.join(by_name)}"
            )
        self._infos.setdefault(None, info)
        self._infos[teacher_model] = info
        if info.black_box:
            return info  # the API teacher takes text: its tokenizer is its own business
        mine = tokenizer_sha256(tokenizer)
        self.other_tokenizer[teacher_model] = info.tokenizer_sha256 != mine
        if info.tokenizer_sha256 != mine and not allow_other_tokenizer:
            raise SystemExit(
                f"error: the student's tokenizer differs from teacher {info.name!r}'s (sha256 {mine[:12]}… vs "
                f"{info.tokenizer_sha256[:12]}…): token ids would mean different things. Use a student "
                "derived from this teacher (opd make-student) or a teacher with the same tokenizer, or train with "
                "--cross-tokenizer, which aligns the two tokenizations by text (docs/methods.md; its held-out "
                "measure for a saved student: python -m opd_bench.xtok.text_eval)."
            )
        return info

    def submit(
        self, rollouts: list[Rollout], top_k: int, score_ids: list | None = None, **options: Any
    ) -> Pending:
        """Token scores of every rollout: one request per teacher name (rollout.teacher), cut further where
        the teacher's per-request limits (max_tokens, max_hidden_bytes) need it. `score_ids` holds one
        [T][M] id list per rollout; other options (e.g. return_hidden) go to client.score as they are."""

        versions: set[int] = set()

        def send(only: list[int]) -> list[Future]:
            groups: dict[str | None, list[int]] = {}
            for i in only:
                groups.setdefault(rollouts[i].teacher, []).append(i)
            return [
                self._pool.submit(self._score, rollouts, part, top_k, score_ids, name, options, versions)
                for name, idx in groups.items()
                for part in self._split(rollouts, idx, name, options)
            ]

        return Pending(len(rollouts), send(list(range(len(rollouts)))), send, versions)

    def _split(
        self, rollouts: list[Rollout], idx: list[int], name: str | None, options: dict
    ) -> list[list[int]]:
        info = self._infos.get(name, self._infos.get(None))
        if info is None:
            return [idx]
        sizes = [
            (
                teacher_view_len(r.prompt_ids + r.completion_ids, len(r.prompt_ids), r.teacher_prefix_ids),
                len(r.completion_ids),
            )
            for r in (rollouts[i] for i in idx)
        ]
        parts = split_requests(sizes, info, options.get("return_hidden", False), options.get("hidden_dtype"))
        return [[idx[j] for j in part] for part in parts]

    def _score(self, rollouts, idx, top_k, score_ids, name, options, versions: set[int]):
        sequences = []
        for i in idx:
            r = rollouts[i]
            seq = {"token_ids": r.prompt_ids + r.completion_ids, "prompt_len": len(r.prompt_ids)}
            if r.teacher_prefix_ids is not None:
                seq["teacher_prefix_ids"] = r.teacher_prefix_ids
            sequences.append(seq)
        ids = [score_ids[i] for i in idx] if score_ids is not None else None
        result = self.client.score(sequences, top_k=top_k, score_ids=ids, model=name, **options)
        if result.weights_version is not None:
            versions.add(result.weights_version)
        return idx, result.sequences

    def submit_chunks(self, requests: list[ChunkScoreRequest]) -> Pending:
        """One black-box chunk-score request per rollout."""

        def send(only: list[int]) -> list[Future]:
            return [
                self._pool.submit(lambda i: ([i], [self.client.chunk_score(requests[i])]), i) for i in only
            ]

        return Pending(len(requests), send(list(range(len(requests)))), send)

    def submit_text(self, requests: list[ScoreTextRequest]) -> Pending:
        """One text-scoring request per rollout (POST /v1/score-text: a teacher with another tokenizer)."""

        def send(only: list[int]) -> list[Future]:
            return [
                self._pool.submit(lambda i: ([i], self.client.score_text(requests[i]).sequences), i)
                for i in only
            ]

        return Pending(len(requests), send(list(range(len(requests)))), send)

    def collect(self, pending: Pending) -> list:
        """Every answer of `pending`, in request order, waiting out teacher outages for up to wait_s."""
        answers = self._collect(pending.n, pending.futures, pending.resend)
        self.last_versions = sorted(pending.versions)
        return answers

    def _collect(self, n: int, futures: list[Future], resubmit) -> list:
        """The n results of futures; on failure, wait (backoff) and resubmit the missing indices."""
        out: list = [None] * n
        started, delay = time.monotonic(), 1.0
        while True:
            failed = None
            for future in futures:
                try:
                    idx, scores = future.result()
                except FATAL:
                    raise
                except Exception as e:  # unreachable, overloaded, timed out: wait and resend
                    failed = e
                    continue
                for i, s in zip(idx, scores, strict=True):
                    out[i] = s
            if failed is None:
                return out
            waited = time.monotonic() - started
            if waited > self.wait_s:
                raise TeacherUnreachable(
                    f"the teacher at {self.url} has been unreachable for {waited:.0f} s "
                    f"(teacher_wait_s = {self.wait_s:.0f}): {failed}"
                )
            # Never sooner than the service asked (Retry-After, e.g. a rate-limited teacher API).
            pause = max(delay, getattr(failed, "retry_after", None) or 0.0)
            self.on_wait(
                f"teacher unreachable ({_short(failed)}); retrying in {pause:.0f} s "
                f"(waited {waited:.0f} s of {self.wait_s:.0f} s)"
            )
            time.sleep(pause)
            delay = min(delay * 2, 30.0)
            missing = [i for i, s in enumerate(out) if s is None]
            futures = resubmit(missing)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def _short(error: BaseException) -> str:
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    return text.splitlines()[0][:160]
