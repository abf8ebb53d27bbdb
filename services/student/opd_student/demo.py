"""`opd demo`: the main job on the embedded default teacher.

Starts the teacher as a separate service process, tokenizes an example conversation with the teacher's
chat template, scores the assistant's answer, and prints what the teacher thinks of every token.
"""

from __future__ import annotations

import argparse
import secrets
import time
from pathlib import Path

import numpy as np

from opd_client.http_client import HttpTeacherClient
from opd_client.launch import start_teacher

EXAMPLE = [
    {"role": "user", "content": "What is the capital of France, and what river runs through it?"},
]
ANSWER = "The capital of France is Paris, and the Seine runs through it.<|im_end|>"


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="serve the default teacher and score an example conversation")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (teacher log)")
    p.add_argument("--teacher-url", help="use this running teacher instead of starting one")
    p.add_argument("--api-key", help="API key for --teacher-url")
    p.add_argument("--top-k", type=int, default=3)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    if args.teacher_url:
        score_example(HttpTeacherClient(args.teacher_url, api_key=args.api_key), args.top_k)
        return
    print("starting the teacher service (opd serve-teacher, embedded SmolLM2-135M-Instruct)...", flush=True)
    started = time.perf_counter()
    with start_teacher(args.out, api_key=secrets.token_urlsafe(16)) as teacher:
        print(
            f"teacher ready at {teacher.http_url} (gRPC {teacher.grpc_target}) in "
            f"{time.perf_counter() - started:.1f} s; log: {teacher.log_path}",
            flush=True,
        )
        with HttpTeacherClient(teacher.http_url, api_key=teacher.api_key) as client:
            score_example(client, args.top_k)


def score_example(client: HttpTeacherClient, top_k: int) -> None:
    info = client.models()[0]
    prompt_ids = client.tokenize(messages=EXAMPLE)
    answer_ids = client.tokenize(text=ANSWER)
    started = time.perf_counter()
    result = client.score(
        [{"token_ids": prompt_ids + answer_ids, "prompt_len": len(prompt_ids)}], top_k=top_k
    )
    elapsed = time.perf_counter() - started
    scores = result.sequences[0]
    vocab = _decoder()

    print(
        f"\nteacher {info.name} (vocab {info.vocab_size}, {info.dtype} on {info.device}, rev {info.revision})"
    )
    print(f"user: {EXAMPLE[0]['content']}\nassistant: {ANSWER}\n")
    print(f"{'token':>16}  {'logprob':>8}  teacher's top-{top_k}")
    for t, token_id in enumerate(answer_ids):
        alternatives = "  ".join(
            f"{vocab(int(i))!r} {lp:.2f}"
            for i, lp in zip(scores.top_ids_T_K[t], scores.top_logprobs_T_K[t], strict=True)
        )
        print(f"{vocab(token_id)!r:>16}  {scores.token_logprobs_T[t]:8.3f}  {alternatives}")
    nll = -float(np.mean(scores.token_logprobs_T))
    print(
        f"\n{len(answer_ids)} tokens scored in {elapsed * 1000:.0f} ms; mean NLL {nll:.3f} nats/token "
        f"(perplexity {np.exp(nll):.2f}); tail mass outside top-{top_k}: "
        f"{float(np.mean(np.exp(scores.tail_logprob_T))):.3f} on average"
    )


def _decoder():
    """Token text by id, from the embedded teacher's tokenizer (the service has no detokenize endpoint)."""
    from transformers import AutoTokenizer

    from opd_client.embedded import embedded_teacher_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_teacher_dir())
    return lambda token_id: tokenizer.decode([token_id])
