"""vLLM's tokens-in / tokens-out `POST /inference/v1/generate`, the route prime-rl scores its teacher with.

prime-rl (PrimeIntellect-ai/prime-rl 559b447, `src/prime_rl/utils/client.py` prefill_logprobs) sends
`{"model", "token_ids", "sampling_params": {"max_tokens": 1, "temperature": 1.0, "top_p": 1.0,
"prompt_logprobs": 1}}` and reads `prompt_logprobs[i]`: null for the first token, else `{token_id: {"logprob",
"rank", "decoded_token"}}` whose first entry is token i's. The shapes are vLLM's (v0.26.0, prime-rl's pin;
`vllm/entrypoints/scale_out/token_in_token_out/protocol.py` GenerateRequest / GenerateResponse in its
"tokens" output mode), and the prompt_logprobs are built exactly as /v1/completions' (openai_shape): the
same /v1/score forward, with exact ranks. `max_tokens` tokens are sampled as /v1/completions samples them
and returned as `choices[0].token_ids`; per-token `logprobs` of generated tokens are not offered here (use
/v1/completions). Errors are opd's (OpenAI's) error object, as vLLM's.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from opd_client import schema
from opd_client.errors import InvalidRequest
from opd_teacher.backends.generate import SamplingParams
from opd_teacher.engine import TeacherEngine
from opd_teacher.http import openai_params as params
from opd_teacher.http import openai_shape as shape
from opd_teacher.http.openai_params import Prompt

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schema.ErrorBody} for status in (400, 401, 404, 413, 422, 429, 503)
}
Number = StrictFloat | StrictInt


class TokensSamplingParams(BaseModel):
    """The vLLM SamplingParams fields that mean something for a teacher; others are refused by name."""

    model_config = ConfigDict(extra="forbid")
    max_tokens: StrictInt | None = Field(default=None, description="default 16, as vLLM's")
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    min_p: Number | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    detokenize: StrictBool = True
    n: StrictInt = 1
    prompt_logprobs: StrictInt | None = None
    logprobs: StrictInt | None = Field(default=None, description="only null: use /v1/completions")


class TokensGenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: StrictStr | None = None
    token_ids: list[StrictInt]
    sampling_params: TokensSamplingParams
    model: StrictStr | None = None
    stream: StrictBool | None = False
    return_token_ids: StrictBool | None = None
    output_mode: StrictStr = "tokens"
    cache_salt: StrictStr | None = None  # only salts vLLM's prefix cache; nothing to salt here
    priority: StrictInt = 0


def vllm_generate_router(engine: TeacherEngine, until_disconnect, deadline_from) -> APIRouter:
    router = APIRouter()

    @router.post("/inference/v1/generate", tags=["vllm"], responses=_ERRORS)
    async def tokens_generate(req: TokensGenerateRequest, request: Request) -> JSONResponse:
        """vLLM's tokens-in/tokens-out generate with prompt_logprobs (prime-rl's teacher route)."""
        work = _tokens_generate(engine, req, deadline_from(request.headers))
        return JSONResponse(await until_disconnect(request, work))

    return router


async def _tokens_generate(engine: TeacherEngine, req: TokensGenerateRequest, deadline: float | None) -> dict:
    backend = engine.backend(req.model)
    info = backend.info
    sp = req.sampling_params
    _refuse_unsupported(req)
    for j, token in enumerate(req.token_ids):
        if not 0 <= token < info.vocab_size:
            raise InvalidRequest(
                f"token_ids[{j}] = {token} is outside the vocabulary [0, {info.vocab_size})",
                field=f"token_ids[{j}]",
            )
    if not req.token_ids:
        raise InvalidRequest("token_ids is empty; send at least 1 token", field="token_ids")
    max_tokens = 16 if sp.max_tokens is None else sp.max_tokens
    if max_tokens < 0:
        raise InvalidRequest(f"max_tokens = {max_tokens} must be >= 0", field="sampling_params.max_tokens")
    prompt = Prompt(ids=list(req.token_ids), text="")
    params.check_lengths([prompt], max_tokens, 1, info, "sampling_params.max_tokens")
    params.check_generation_tokens(
        "sampling_params.max_tokens", max_tokens, engine.limits.max_generation_tokens
    )
    prompt_k = params.top_count("sampling_params.prompt_logprobs", sp.prompt_logprobs, info)
    sampling = _sampling(sp, max_tokens, info) if max_tokens else None

    prompt_lps = None
    if prompt_k is not None:
        text = shape.TokenText(backend)
        rows = shape.prompt_rows(prompt.ids, await _score(engine, info.name, prompt.ids, prompt_k, deadline))
        prompt_lps = shape.prompt_logprobs(rows, prompt_k, text)
    token_ids: list[int] = []
    finish = "length"
    if sampling is not None:
        (sample,) = await engine.generate(info.name, prompt.ids, sampling)
        token_ids, finish = sample.token_ids, sample.finish_reason or "length"
    body: dict = {
        "request_id": req.request_id or uuid.uuid4().hex,
        "model": info.name,
        "choices": [{"index": 0, "finish_reason": finish, "token_ids": token_ids, "logprobs": None}],
        "prompt_logprobs": prompt_lps,
        "kv_transfer_params": None,
    }
    if req.return_token_ids:
        body["prompt_token_ids"] = prompt.ids
    return body


def _refuse_unsupported(req: TokensGenerateRequest) -> None:
    checks = (
        ("stream", bool(req.stream), "stream = true is not supported: answers come as one JSON body"),
        ("output_mode", req.output_mode != "tokens", 'only output_mode "tokens" is served here'),
        ("priority", req.priority != 0, "priority must be 0 (no priority scheduling here)"),
        ("sampling_params.n", req.sampling_params.n != 1, "n must be 1"),
        (
            "sampling_params.logprobs",
            req.sampling_params.logprobs is not None,
            "logprobs of generated tokens are not served on this route; use POST /v1/completions",
        ),
    )
    for field, bad, message in checks:
        if bad:
            raise InvalidRequest(message, field=field)


def _sampling(sp: TokensSamplingParams, max_tokens: int, info: schema.ModelInfo) -> SamplingParams:
    """The sampler's parameters, with /v1/completions' checks (the request's names, under sampling_params)."""
    as_completion = _CompletionView(sp)
    try:
        return params.sampling_params(as_completion, max_tokens, 0, info)  # type: ignore[arg-type]
    except InvalidRequest as e:
        raise InvalidRequest(e.message, field=f"sampling_params.{e.field}") from e


class _CompletionView:
    """The fields params.sampling_params reads from a completion request, taken from vLLM's SamplingParams."""

    def __init__(self, sp: TokensSamplingParams) -> None:
        self.temperature, self.top_p, self.top_k, self.min_p = sp.temperature, sp.top_p, sp.top_k, sp.min_p
        self.seed, self.stop, self.stop_token_ids, self.ignore_eos = (
            sp.seed,
            sp.stop,
            sp.stop_token_ids,
            sp.ignore_eos,
        )
        self.skip_special_tokens = sp.skip_special_tokens
        self.include_stop_str_in_output = sp.include_stop_str_in_output
        self.n = sp.n


async def _score(engine: TeacherEngine, name: str, ids: list[int], k: int, deadline: float | None):
    """/v1/score's answer for token_ids = the prompt, prompt_len = 1, with exact ranks; None for 1 token."""
    if len(ids) < 2:
        return None
    req = schema.ScoreRequest(
        model=name, sequences=[schema.Sequence(token_ids=ids, prompt_len=1)], top_k=max(k, 1)
    )
    result = await engine.score(req, deadline, ranks=True)
    return result.sequences[0]
