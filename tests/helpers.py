"""Test helpers: free ports, a tiny model, and a real `opd serve-teacher` process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

OPD = str(Path(sys.executable).with_name("opd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_model(out_dir: Path, layers: int = 4, seed: int = 0) -> Path:
    """A random small Llama with the default teacher's tokenizer (fast forward, same ids)."""
    import torch
    from opd_client.embedded import embedded_teacher_dir
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out_dir / "config.json").exists():
        return out_dir
    teacher_dir = embedded_teacher_dir()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a sharper-than-init distribution, so top-k is not nearly uniform
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@dataclass
class TeacherProcess:
    process: subprocess.Popen
    http_url: str
    grpc_target: str
    api_key: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_teacher(
    workdir: Path,
    models: list[str],
    api_key: str | None = "test-key",
    extra_args: list[str] = (),
    ready_timeout: float = 180,
) -> TeacherProcess:
    """Start the real `opd serve-teacher` on free loopback ports and wait until it is ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, grpc_port = free_port(), free_port()
    args = [
        OPD,
        "serve-teacher",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--grpc-port",
        str(grpc_port),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        *extra_args,
    ]
    for model in models:
        args += ["--model", model]
    if api_key is not None:
        key_file = workdir / "api-key"
        key_file.write_text(api_key + "\n")
        args += ["--api-key-file", str(key_file)]
    log_path = workdir / f"teacher-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    teacher = TeacherProcess(
        process, f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", api_key or "", log_path
    )
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"opd serve-teacher exited with {process.returncode}:\n{teacher.log()}")
        try:
            if httpx.get(f"{teacher.http_url}/health/ready", timeout=2).status_code == 200:
                return teacher
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    teacher.stop()
    raise RuntimeError(f"opd serve-teacher not ready after {ready_timeout} s:\n{teacher.log()}")
