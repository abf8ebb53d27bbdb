"""`opd serve-teacher`: flags → ServerConfig and model loaders → serve()."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from opd_common.dataclass_flags import add_dataclass_flags, add_deprecated_alias, dataclass_from_args
from opd_common.embedded import DEFAULT_TEACHER
from opd_teacher.backends.base import Backend
from opd_teacher.backends.hf import HFBackend, HFLimits
from opd_teacher.backends.steering import SteeringOptions, read_vector
from opd_teacher.batcher import BatchLimits
from opd_teacher.blackbox.api_client import PREFILL_MODES, ApiLimits
from opd_teacher.weight_updates import WeightLimits


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve-teacher",
        help="serve teacher models over HTTP and gRPC",
        description="Serve one or more teacher models: top-k logprobs over token sequences (HTTP + gRPC).",
    )
    p.add_argument(
        "--model",
        action="append",
        metavar="[ALIAS=]NAME_OR_PATH",
        help=f"teacher to serve (repeat for several; default: the embedded {DEFAULT_TEACHER}). "
        "A local HF directory, or the embedded name. The first one is the default.",
    )
    p.add_argument(
        "--name",
        action="append",
        default=[],
        help="alias for the --model at the same position (alternative to ALIAS=)",
    )
    p.add_argument(
        "--backend",
        choices=["hf", "openai"],
        default="hf",
        help="hf: white-box HF transformers model; openai: black-box teacher behind an OpenAI-compatible "
        "chat API (--api-base, --api-model), served through POST /v1/chunk-score",
    )
    api = p.add_argument_group("black-box teacher (--backend openai)")
    api.add_argument("--api-base", help="the API's base URL, e.g. https://api.example.com/v1")
    api.add_argument(
        "--api-model", help="the model name the API expects; also the teacher's name unless --name"
    )
    api.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="environment variable holding the API key (sent as 'Authorization: Bearer KEY')",
    )
    # calls, timeouts and retries: ApiLimits' fields as --api-max-concurrency, --api-timeout, ...
    add_dataclass_flags(
        api,
        ApiLimits,
        defaults_from_cls=True,
        flag_prefix="api-",
        rename={
            "timeout_s": "--api-timeout",
            "initial_backoff_s": "--api-initial-backoff",
            "max_backoff_s": "--api-max-backoff",
        },
    )
    api.add_argument(
        "--api-prefill",
        choices=list(PREFILL_MODES),
        default="auto",
        help="how the API is asked to continue the student's partial answer: completions (the raw-text "
        "/v1/completions endpoint, prompt written by opd in the teacher's chat template: the teacher continues "
        "the exact prefix), assistant (a final assistant message the API continues), continue (that plus "
        "vLLM's continue_final_message), instruct (any chat API: the start of the answer is shown in the user "
        "turn; the last resort), auto (completions if the API answers it at start-up, else instruct; logged)",
    )
    api.add_argument(
        "--api-chat-template",
        type=Path,
        default=None,
        help="for --api-prefill completions/auto: the teacher's chat template, as a tokenizer directory or a "
        "Jinja file (default: ChatML, <|im_start|>role ... <|im_end|>)",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--grpc-port", type=int, default=50051, help="gRPC port; 0 disables gRPC")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on CUDA, float32 on CPU",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument(
        "--api-key-file",
        type=Path,
        help="file with accepted API keys, one per line; then every endpoint but health needs "
        "'Authorization: Bearer KEY'",
    )
    add_dataclass_flags(p, HFLimits, defaults_from_cls=True)  # request limits and scoring
    add_deprecated_alias(p, "--score-chunk-tokens", "--logits-block-tokens")  # its former name
    add_dataclass_flags(p, BatchLimits, defaults_from_cls=True)
    steer = p.add_argument_group("activation steering (SafeSteer; vectors from opd make-steering-vector)")
    add_dataclass_flags(steer, SteeringOptions, defaults_from_cls=True)
    live = p.add_argument_group("live weight updates (PUT /v1/models/NAME/weights, POST .../reload)")
    add_dataclass_flags(live, WeightLimits, defaults_from_cls=True)
    p.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds to finish in-flight requests after SIGTERM"
    )
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=main)


def parse_models(models: list[str] | None, names: list[str]) -> dict[str, str]:
    """{alias: name_or_path}; aliases from ALIAS=PATH, --name, or the directory's name."""
    models = models or [DEFAULT_TEACHER]
    if len(names) > len(models):
        raise SystemExit(f"error: {len(names)} --name for {len(models)} --model")
    out: dict[str, str] = {}
    for i, spec in enumerate(models):
        alias, sep, path = spec.partition("=")
        if not sep:
            alias, path = (names[i] if i < len(names) else Path(spec).name or spec), spec
        elif i < len(names):
            raise SystemExit(f"error: --model {spec!r} has an alias already; drop its --name")
        if alias in out:
            raise SystemExit(f"error: two teachers are named {alias!r}; use ALIAS=PATH to tell them apart")
        out[alias] = path
    return out


def read_api_keys(path: Path | None) -> set[str]:
    if path is None:
        return set()
    try:
        keys = {
            line.strip()
            for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        }
    except OSError as e:
        raise SystemExit(f"error: cannot read --api-key-file {path}: {e.strerror}") from e
    if not keys:
        raise SystemExit(f"error: --api-key-file {path} holds no key")
    return keys


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from opd_teacher.server import ServerConfig, serve

    batch = dataclass_from_args(BatchLimits, args)
    loaders = blackbox_loaders(args) if args.backend == "openai" else hf_loaders(args, batch)
    config = ServerConfig(
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port or None,
        api_keys=read_api_keys(args.api_key_file),
        drain_timeout_s=args.drain_timeout,
        batch=batch,
        weights=dataclass_from_args(WeightLimits, args),
    )
    asyncio.run(serve(config, loaders))


def hf_loaders(args: argparse.Namespace, batch: BatchLimits) -> dict[str, Callable[[], Backend]]:
    limits = dataclass_from_args(HFLimits, args)
    steering = dataclass_from_args(SteeringOptions, args)
    if steering.steering_vector:
        try:  # read now: a wrong file fails before the service starts, with the flag's name
            read_vector(steering.steering_vector)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    return {
        alias: partial(
            HFBackend,
            alias,
            path,
            dtype=args.dtype,
            device=args.device,
            limits=limits,
            batch=batch,
            steering=steering,
        )
        for alias, path in parse_models(args.model, args.name).items()
    }


def blackbox_loaders(args: argparse.Namespace) -> dict[str, Callable[[], Backend]]:
    """One black-box teacher from the --api-* flags; its key is read from the environment, never a flag."""
    import os

    from opd_teacher.blackbox.backend import BlackBoxBackend
    from opd_teacher.blackbox.chat_template import ChatTemplate

    if not args.api_base or not args.api_model:
        raise SystemExit("error: --backend openai needs --api-base URL and --api-model NAME")
    if args.model:
        raise SystemExit("error: --model is for --backend hf; name an API teacher with --name")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise SystemExit(f"error: --api-key-env {args.api_key_env}: that environment variable is not set")
    for flag, value, low in (
        ("--api-max-concurrency", args.max_concurrency, 1),
        ("--api-max-attempts", args.max_attempts, 1),
    ):
        if value < low:
            raise SystemExit(f"error: {flag} must be >= {low}; got {value}")
    limits = dataclass_from_args(ApiLimits, args)
    try:  # read now: a wrong path fails before the service starts, with the flag's name
        template = ChatTemplate.load(args.api_chat_template)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    name = args.name[0] if args.name else args.api_model
    return {
        name: partial(
            BlackBoxBackend,
            name,
            args.api_base,
            args.api_model,
            api_key,
            limits,
            prefill=args.api_prefill,
            max_request_tokens=args.max_sequence_len or 4096,
            chat_template=template,
        )
    }
