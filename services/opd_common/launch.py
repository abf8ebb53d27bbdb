"""Start a local `opd serve-teacher` process on free loopback ports and wait until it is ready.

Used by `opd demo` and `opd train` when no --teacher-url is given, and by the tests: always the real
service process, never an in-process shortcut.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class LocalTeacher:
    process: subprocess.Popen
    http_url: str
    grpc_target: str
    api_key: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (graceful drain), then SIGKILL if it does not exit in time; returns the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> LocalTeacher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_teacher(
    workdir: Path,
    models: list[str] | None = None,
    api_key: str | None = None,
    extra_args: list[str] | tuple[str, ...] = (),
    ready_timeout: float = 300,
    port: int | None = None,
    grpc_port: int | None = None,
) -> LocalTeacher:
    """Run `opd serve-teacher` (default: the embedded teacher) with its log in workdir."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, grpc_port = port or free_port(), grpc_port or free_port()
    args = [
        sys.executable,
        "-m",
        "opd_cli.main",
        "serve-teacher",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--grpc-port",
        str(grpc_port),
        *extra_args,
    ]
    for model in models or []:
        args += ["--model", model]
    if api_key is not None:
        key_file = workdir / "teacher-api-key"
        key_file.write_text(api_key + "\n")
        key_file.chmod(0o600)
        args += ["--api-key-file", str(key_file)]
    log_path = workdir / f"teacher-{port}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    teacher = LocalTeacher(
        process, f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", api_key or "", log_path
    )
    try:
        wait_ready(teacher, ready_timeout)
    except BaseException:
        teacher.stop()
        raise
    return teacher


def wait_ready(teacher: LocalTeacher, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if teacher.process.poll() is not None:
            raise RuntimeError(
                f"opd serve-teacher exited with {teacher.process.returncode}:\n{teacher.log()[-4000:]}"
            )
        try:
            if httpx.get(f"{teacher.http_url}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"opd serve-teacher not ready after {timeout:.0f} s:\n{teacher.log()[-4000:]}")
