"""Where downloaded teacher heads live, and the check that a file is the head /v1/models announces.

Heads are cached by content: `$OPD_CACHE_DIR/heads/<sha256>.safetensors` (default ~/.cache/opd), so a
head is downloaded once per machine however many runs or teachers share it, and a new build of a teacher
(a new sha) never reads a stale file. A download is hashed as it streams and renamed into place only when
its sha256 is the one the teacher announced; a cached file is hashed again before every use, so a
truncated or corrupted file is fetched anew rather than trusted. Torch-free: loading is opd_client.head.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from opd_client.errors import InvalidRequest, NotFound, OpdError
from opd_client.schema import ModelInfo

if TYPE_CHECKING:
    from opd_client.head import TeacherHead


class HeadMismatch(OpdError):
    """The bytes received are not the head the teacher announced (sha256 differs); nothing was cached."""

    http_status = 502
    grpc_code = "DATA_LOSS"
    type = "head_mismatch_error"


def cache_dir() -> Path:
    """$OPD_CACHE_DIR/heads, else ~/.cache/opd/heads (the same root as the service's converted models)."""
    root = Path(os.environ.get("OPD_CACHE_DIR") or Path.home() / ".cache" / "opd")
    return root / "heads"


def head_info(infos: Iterable[ModelInfo], name: str | None) -> ModelInfo:
    """The /v1/models record of teacher `name` (None: the first, the service's default), if it has a head."""
    infos = list(infos)
    if not infos:
        raise NotFound("the service lists no teachers", field="model")
    info = infos[0] if name is None else next((i for i in infos if i.name == name), None)
    if info is None:
        names = ", ".join(i.name for i in infos)
        raise NotFound(f"model {name!r} is not served here; available: {names}", field="model")
    if not info.head_sha256 or not info.hidden_size:
        raise InvalidRequest(
            f"teacher {info.name!r} serves no output head (black-box, or its logits are not the head "
            "formula of docs/api.md); train with top-k scores instead",
            field="model",
        )
    return info


def cached_bytes(info: ModelInfo) -> bytes | None:
    """The bytes of `info`'s cached head if the file exists and hashes to info.head_sha256 (else it is
    removed). The bytes hashed are the bytes returned: nothing can change between check and use."""
    path = cache_dir() / f"{info.head_sha256}.safetensors"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if hashlib.sha256(data).hexdigest() == info.head_sha256:
        return data
    path.unlink(missing_ok=True)  # corrupted or truncated: fetch it again
    return None


class HeadDownload:
    """A head being received: `write` chunks in order, then `finish()` verifies and moves it into the cache.

        with HeadDownload(info) as sink:
            for chunk in response: sink.write(chunk)
        path = sink.finish()

    Leaving the block without finish() (an error mid-stream) deletes the partial file.
    """

    def __init__(self, info: ModelInfo):
        self.info = info
        self.path = cache_dir() / f"{info.head_sha256}.safetensors"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".partial-", suffix=".safetensors")
        self._file = os.fdopen(fd, "wb")
        self._tmp = Path(tmp)
        self._digest = hashlib.sha256()
        self.bytes = 0

    def write(self, chunk: bytes) -> None:
        self._digest.update(chunk)
        self._file.write(chunk)
        self.bytes += len(chunk)

    def finish(self) -> Path:
        self._file.close()
        got = self._digest.hexdigest()
        if got != self.info.head_sha256:
            self._tmp.unlink(missing_ok=True)
            raise HeadMismatch(
                f"the head of {self.info.name!r} received ({self.bytes} bytes) hashes to sha256 {got}, but "
                f"/v1/models announces {self.info.head_sha256}; not cached. Retry; if it persists the "
                "teacher changed while downloading or something between you and it alters the bytes"
            )
        os.replace(self._tmp, self.path)  # atomic: a concurrent reader sees no file or the whole file
        return self.path

    def __enter__(self) -> HeadDownload:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)


def load(data: bytes | None, info: ModelInfo) -> TeacherHead:
    """cached_bytes(info) (read again after a download) as a TeacherHead."""
    if data is None:  # the download verified, but the file is gone or altered since (another process?)
        raise HeadMismatch(f"the head of {info.name!r} was downloaded but its cached file no longer verifies")
    from opd_client.head import load_head  # torch, which the rest of opd_client never imports

    return load_head(data, info)
