"""Test helpers: free ports, a tiny model, and a real `opd serve-teacher` process."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np

from opd_client.scores import ScoreResult
from opd_common.launch import LocalTeacher, free_port

__all__ = [
    "LocalTeacher",
    "assert_same_scores",
    "free_port",
    "make_tiny_model",
    "post_score",
    "start_teacher",
]


def make_tiny_model(out_dir: Path, layers: int = 4, seed: int = 0) -> Path:
    """A random small Llama with the default teacher's tokenizer (fast forward, same ids)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from opd_common.embedded import embedded_teacher_dir

    if (out_dir / "config.json").exists():
        return out_dir
    tokenizer = AutoTokenizer.from_pretrained(embedded_teacher_dir())
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


def start_teacher(
    workdir: Path,
    models: list[str],
    api_key: str | None = "test-key",
    extra_args: list[str] | tuple[str, ...] = (),
    ready_timeout: float = 180,
    port: int | None = None,
    grpc_port: int | None = None,
) -> LocalTeacher:
    """The real `opd serve-teacher`, fp32 on CPU, on free loopback ports."""
    from opd_common.launch import start_teacher as launch

    return launch(
        workdir,
        models,
        api_key=api_key,
        ready_timeout=ready_timeout,
        port=port,
        grpc_port=grpc_port,
        extra_args=["--device", "cpu", "--dtype", "float32", *extra_args],
    )


def post_score(teacher: LocalTeacher, body: dict) -> dict:
    """POST /v1/score with the teacher's key; the JSON body of a 200 answer."""
    r = httpx.post(
        f"{teacher.http_url}/v1/score",
        json=body,
        timeout=120,
        headers={"Authorization": f"Bearer {teacher.api_key}"},
    )
    assert r.status_code == 200, r.text
    return r.json()


def assert_same_scores(a: ScoreResult, b: ScoreResult, atol: float = 0.0) -> None:
    """Same model, usage, ids exactly, and every logprob array within atol."""
    assert a.model == b.model and len(a.sequences) == len(b.sequences)
    assert (a.scored_tokens, a.forward_tokens) == (b.scored_tokens, b.forward_tokens)
    for x, y in zip(a.sequences, b.sequences, strict=True):
        np.testing.assert_array_equal(x.top_ids_T_K, y.top_ids_T_K)
        for attr in ("token_logprobs_T", "top_logprobs_T_K", "tail_logprob_T", "score_logprobs_T_M"):
            u, v = getattr(x, attr), getattr(y, attr)
            assert (u is None) == (v is None), attr
            if u is not None:
                assert u.shape == v.shape, attr
                assert np.max(np.abs(u - v), initial=0.0) <= atol, attr


def train_in_process(cfg):
    """`opd train`'s train(cfg) in this process, with pytest's SIGINT/SIGTERM handlers given back after
    (train installs its own). Returns the run directory."""
    import signal

    from opd_student.train import train

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return train(cfg)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
