"""SGLang's native `POST /generate`, so trainers written for an SGLang teacher (slime, miles) use opd with
only a URL change.

Request and answer shapes are SGLang v0.5.23's (sglang_request.py, sglang_shape.py). SGLang serves the route
at `/generate` only (POST and PUT; there is no `/v1/generate`), plus `GET /health_generate`, its readiness
probe. Every logprob and hidden state comes from engine.score, the batcher and forward behind /v1/score: a
prompt is one /v1/score sequence over its input (and generated) tokens, so the numbers are /v1/score's.
Tokens asked for with max_new_tokens > 0 are sampled by engine.generate (as /v1/completions) and then scored
with the input in one pass. SGLang's errors are `{"error": {"message"}}` with status 400; ours add `param`
(the field), `type` and `code`, keep 401/404/429/503 (a client may retry those), and answer every other
refusal (a too-long input, a bad type) with 400 as SGLang does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from opd_client import schema
from opd_client.errors import OpdError
from opd_teacher.engine import TeacherEngine
from opd_teacher.http.errors import error_response
from opd_teacher.http.openai_shape import TokenText
from opd_teacher.http.sglang_request import Prompt, parse_prompts, refuse
from opd_teacher.http.sglang_shape import Scored, answer, finish_reason

PAD_ID = 0  # appended after an input whose last position's hidden state is asked for (see _score)
_RETRYABLE_OR_AUTH = (401, 404, 429, 503)


def sglang_router(engine: TeacherEngine, until_disconnect, deadline_from) -> APIRouter:
    """The routes; `until_disconnect(request, work)` and `deadline_from(headers)` come from app.py."""
    router = APIRouter()

    @router.api_route("/generate", methods=["POST", "PUT"], tags=["sglang"])
    async def generate(request: Request) -> Response:
        """SGLang's native generate: input logprobs (return_logprob, logprob_start_len, top_logprobs_num,
        token_ids_logprob), hidden states, and sampling; see docs/api.md."""
        try:
            work = _generate(engine, await _json(request), request.query_params.get("model"), request)
            return JSONResponse(await until_disconnect(request, work))
        except OpdError as err:
            return sglang_error(err)

    @router.get("/health_generate", tags=["health"], responses={503: {"model": schema.HealthStatus}})
    async def health_generate() -> Response:
        """SGLang's readiness probe (as /health/ready)."""
        if engine.ready:
            return JSONResponse({"status": "ok"})
        status = "draining" if engine.draining else "loading"
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "2"})

    async def _generate(engine: TeacherEngine, body: Any, model: str | None, request: Request) -> Any:
        if isinstance(body, dict) and body.get("model") is not None:
            model = body["model"]
        backend = engine.backend(model)
        info = backend.info
        if info.black_box:
            raise refuse("model", f"teacher {info.name!r} is black-box: score it with POST /v1/chunk-score")

        def tokenize(text: str) -> list[int]:  # SGLang: tokenizer(text), the tokenizer's special tokens added
            return backend.tokenize_text(text, add_special_tokens=True)

        prompts, batch = parse_prompts(body, info, tokenize, engine.limits.max_generation_tokens)
        text = TokenText(backend) if isinstance(body, dict) and body.get("return_text_in_logprobs") else None
        deadline = deadline_from(request.headers)
        answers = await asyncio.gather(*(_one(engine, info.name, p, text, deadline) for p in prompts))
        return list(answers) if batch else answers[0]

    return router


def sglang_error(err: OpdError) -> JSONResponse:
    """The error in SGLang's shape ({"error": {"message"}}) with opd's param / type / code beside it."""
    response = error_response(err)
    if err.http_status in _RETRYABLE_OR_AUTH:
        return response
    body = err.to_body()
    body["error"]["code"] = 400
    return JSONResponse(body, status_code=400)


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError as e:
        raise refuse("body", f"malformed JSON body: {e}") from e


async def _one(engine: TeacherEngine, name: str, prompt: Prompt, text: TokenText | None, deadline) -> dict:
    if prompt.rid is None:  # SGLang's normalize: a fresh id per prompt
        prompt = dataclasses.replace(prompt, rid=uuid.uuid4().hex)
    output_ids: list[int] = []
    output_text, finish = "", finish_reason([], None, None)
    if prompt.sampling is not None:
        (sample,) = await engine.generate(name, prompt.ids, prompt.sampling)
        output_ids, output_text = sample.token_ids, sample.text
        finish = finish_reason(output_ids, sample.finish_reason, sample.stop_reason)
    scored = await _score(engine, name, prompt, output_ids, deadline)
    return answer(prompt, output_ids, output_text, finish, scored, text)


async def _score(engine: TeacherEngine, name: str, prompt: Prompt, output_ids: list[int], deadline) -> Scored:
    """One /v1/score sequence with everything the answer needs.

    Logprobs: the tokens from logprob_start_len + 1 on (the first returned entry has none). Hidden states:
    SGLang gives one row per position of the input and the generated tokens but the last; /v1/score gives
    row j for the position that predicts completion token j, so the sequence is scored from prompt_len 1,
    and an input with nothing generated gets one pad token appended, whose own scores are dropped (causal
    attention: the positions before it do not see it)."""
    tokens = prompt.ids + output_ids
    length = len(prompt.ids)
    if prompt.hidden:
        prompt_len = 1
        tokens = tokens + ([PAD_ID] if not output_ids else [])
    elif prompt.return_logprob:
        prompt_len = max(min(prompt.start + 1, length), 1)
    else:
        return Scored(tokens, len(tokens), None)
    if prompt_len >= len(tokens):  # a one-token input, nothing generated: only the first (empty) entry
        return Scored(tokens, prompt_len, None)
    scored_T = len(tokens) - prompt_len
    req = schema.ScoreRequest(
        model=name,
        sequences=[schema.Sequence(token_ids=tokens, prompt_len=prompt_len)],
        top_k=max(prompt.top_n, 1) if prompt.return_logprob else 0,
        score_ids=[[prompt.token_ids] * scored_T] if prompt.return_logprob and prompt.token_ids else None,
        return_hidden=prompt.hidden,
        hidden_dtype="float32" if prompt.hidden else None,  # the model's values, exactly (as JSON floats)
    )
    result = await engine.score(req, deadline)
    return Scored(tokens, prompt_len, result.sequences[0])
