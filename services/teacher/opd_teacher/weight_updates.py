"""Live weight updates at the service's edge: the settings, where a pushed body waits, what a reload may read.

A push (PUT /v1/models/{name}/weights, gRPC UpdateWeights) is spooled to a temporary file as it arrives,
counted against `max_weights_bytes` (refused at the first byte over, or at once from its Content-Length),
and checked and staged from there (backends/live_weights.py); a reload (POST .../reload, gRPC ReloadWeights)
reads a safetensors file or a directory of shards the service can read. Nothing here knows torch.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from opd_client.errors import InvalidRequest, TooManyTokens

# Slack for the safetensors header above the tensors' own bytes in the default body limit: the JSON of a
# 400-tensor model is ~40 KB, of a 2,000-tensor one ~200 KB.
HEADER_SLACK_BYTES = 16 * 2**20
_WRITE_BYTES = 4 * 2**20  # pushed bytes are written to the spool file in pieces of about this size


@dataclass(frozen=True)
class WeightLimits:
    """Live weight updates; `opd serve-teacher`'s flags are generated from these fields (each comment is the
    flag's --help)."""

    # accept weight pushes (PUT /v1/models/NAME/weights) and reloads (POST /v1/models/NAME/reload); off,
    # both answer 403. They need the API key like every endpoint: anyone holding one can change the teacher
    weight_updates: bool = False
    # largest push body in bytes (default: the bytes of all the model's tensors, a tied one under each of
    # its names, + 16 MiB for the header)
    max_weights_bytes: int | None = None
    # directory a push is spooled to while it arrives and is checked (default: the system's temp directory)
    weights_spool_dir: str | None = None
    # reload paths must lie inside this directory (default: any path the service can read)
    reload_root: str | None = None


class BodyTooLarge(TooManyTokens):
    """413 like a request of too many tokens: resending the same body can never fit."""


def body_limit(limits: WeightLimits, model_bytes: int) -> int:
    """The most bytes one push may hold for a model of `model_bytes` weight bytes."""
    if limits.max_weights_bytes is not None:
        return limits.max_weights_bytes
    return model_bytes + HEADER_SLACK_BYTES


class WeightsSpool:
    """A pushed body on its way to disk: `await write(piece)` as pieces arrive, then `path` holds it all.

    Use as a context manager: the file is removed on exit, whatever happened.
    """

    def __init__(self, limit: int, spool_dir: str | None, declared: int | None = None) -> None:
        if declared is not None and declared > limit:
            raise BodyTooLarge(
                f"the body is {declared} bytes (Content-Length), above max_weights_bytes = {limit}",
                field="body",
            )
        self.limit = limit
        self.received = 0
        fd, name = tempfile.mkstemp(prefix="opd-weights-", suffix=".safetensors", dir=spool_dir)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    async def write(self, piece: bytes) -> None:
        self.received += len(piece)
        if self.received > self.limit:
            raise BodyTooLarge(
                f"the body passed max_weights_bytes = {self.limit} bytes (the service's limit for this "
                "model; --max-weights-bytes)",
                field="body",
            )
        self._pending.append(piece)
        self._pending_bytes += len(piece)
        if self._pending_bytes >= _WRITE_BYTES:
            await self._flush()

    async def finish(self) -> Path:
        """Everything written and closed; the file's path."""
        await self._flush()
        await asyncio.to_thread(self._file.close)
        return self.path

    async def _flush(self) -> None:
        data, self._pending, self._pending_bytes = b"".join(self._pending), [], 0
        if data:  # off the event loop: a push is hundreds of MB
            await asyncio.to_thread(self._file.write, data)

    def __enter__(self) -> WeightsSpool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def reload_files(path: str, root: str | None) -> list[Path]:
    """The safetensors files a reload of `path` reads: the file itself, or a directory's *.safetensors."""
    where = Path(path)
    if not where.is_absolute():
        raise InvalidRequest(
            f"path {path!r} must be absolute (the service's working directory is its own)", field="path"
        )
    resolved = where.resolve()
    if root is not None:
        base = Path(root).resolve()
        if not resolved.is_relative_to(base):
            raise InvalidRequest(
                f"path {path!r} is outside the directory reloads may read (--reload-root {root})",
                field="path",
            )
    if resolved.is_dir():
        files = sorted(resolved.glob("*.safetensors"))
        if not files:
            raise InvalidRequest(f"path {path!r} is a directory without *.safetensors files", field="path")
        return files
    if not resolved.is_file():
        raise InvalidRequest(f"path {path!r} does not exist on the teacher's machine", field="path")
    if not os.access(resolved, os.R_OK):
        raise InvalidRequest(f"path {path!r} is not readable by the teacher service", field="path")
    return [resolved]
