"""A client of any OpenAI-compatible `POST /v1/chat/completions`: the black-box teacher's only channel.

Bounded concurrency (a semaphore), a timeout per call, retries with backoff on 408/409/429/5xx, timeouts,
dropped connections and unreadable answers, never sooner than the API's Retry-After (opd_client.retry). A
Retry-After longer than the retry budget is not slept through here: it is passed on to our caller (429 +
Retry-After), whose client or trainer waits it out. Every failure that outlives the retries becomes an
OpdError whose message names the API, the status and what was wrong with the answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import httpx

from opd_client.errors import OpdError, Overloaded, Unavailable, UpstreamError
from opd_client.retry import RetryPolicy, parse_retry_after
from opd_teacher.blackbox.chunks import TeacherToken

log = logging.getLogger(__name__)
T = TypeVar("T")

_SNIPPET = 200
# Statuses worth another try: the API is busy, restarting, or lost our request.
_RETRY_STATUSES = {408, 409, 425, 429}

# How the API is made to continue a partial answer (--api-prefill; opd_teacher.blackbox.backend says each).
PREFILL_MODES = ("auto", "completions", "assistant", "continue", "instruct")


@dataclass(frozen=True)
class ApiLimits:
    """How the black-box teacher calls its API; the `--api-*` flags of `opd serve-teacher` are generated from
    these fields (each comment is the flag's --help), so the retry settings are plain fields here and
    `retry` assembles them."""

    max_concurrency: int = 8  # calls in flight to the API at once
    timeout_s: float = 60.0  # seconds per API call before a retry
    max_attempts: int = 4  # tries per API call (first included) on 429/5xx, timeouts and unreadable answers
    initial_backoff_s: float = 0.5  # wait before the first retry; it doubles with each further try
    # longest wait between tries; a longer Retry-After is passed on to our caller (429 + Retry-After)
    max_backoff_s: float = 30.0
    jitter: float = 0.2  # ± fraction of each wait, so several replicas do not retry in lockstep
    max_top_logprobs: int = 20  # most top_logprobs asked of the API per token (what hosted APIs allow)

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts,
            initial_backoff_s=self.initial_backoff_s,
            max_backoff_s=self.max_backoff_s,
            jitter=self.jitter,
        )


@dataclass
class ApiChoice:
    text: str
    finish_reason: str | None
    tokens: list[TeacherToken] | None  # with logprobs: one entry per generated token


@dataclass
class ApiUsage:
    """What one chunk-score request cost at the API (summed over its calls)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0

    def add(self, body: dict) -> None:
        usage = body.get("usage")
        if not isinstance(usage, dict):
            usage = {}
        self.requests += 1
        self.prompt_tokens += _int(usage.get("prompt_tokens"))
        self.completion_tokens += _int(usage.get("completion_tokens"))


class OpenAIChatAPI:
    """POST {api_base}/chat/completions (or the raw-text /completions) with retries; one instance per served
    black-box teacher."""

    def __init__(self, api_base: str, api_model: str, api_key: str | None, limits: ApiLimits) -> None:
        self.api_base = api_base.rstrip("/")
        self.api_model = api_model
        self.limits = limits
        self.url = f"{self.api_base}/chat/completions"
        self.completions_url = f"{self.api_base}/completions"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._headers = headers
        self._http = httpx.AsyncClient(headers=headers, timeout=limits.timeout_s)
        self._slots: asyncio.Semaphore | None = None
        # Whether the API honours n > 1 (llama-cpp-python, for one, answers a single choice): learned from
        # the first answer, then n samples are asked for one call each where it does not.
        self.honours_n: bool | None = None

    async def complete(
        self,
        request: dict,
        n: int,
        max_tokens: int,
        temperature: float,
        usage: ApiUsage,
        top_logprobs: int = 0,
        extra_body: dict | None = None,
    ) -> list[ApiChoice]:
        """n choices for `request`: {"messages": [...]} goes to chat/completions, {"prompt": text} to the
        raw-text completions endpoint (several calls when the API answers fewer than asked)."""
        body = {"model": self.api_model, **request, "max_tokens": max_tokens, "temperature": temperature}
        top_logprobs = min(top_logprobs, self.limits.max_top_logprobs)
        raw_text = "prompt" in request
        if top_logprobs:  # the two endpoints ask for them differently (OpenAI's legacy format for raw text)
            body |= (
                {"logprobs": top_logprobs} if raw_text else {"logprobs": True, "top_logprobs": top_logprobs}
            )
        body |= extra_body or {}

        def call(fields: dict) -> Awaitable[list[ApiChoice]]:
            return self._choices(body | fields, usage, top_logprobs, raw_text)

        if n == 1 or self.honours_n is False:
            calls = [call({"n": 1} if n > 1 else {}) for _ in range(n)]
            return [c for answer in await gather_or_cancel(*calls) for c in answer][:n]
        choices = await call({"n": n})
        if self.honours_n is None:
            self.honours_n = len(choices) >= n
        missing = n - len(choices)
        if missing > 0:
            more = await gather_or_cancel(*[call({"n": 1}) for _ in range(missing)])
            choices += [c for answer in more for c in answer]
        return choices[:n]

    def probe_completions(self) -> str | None:
        """None when the raw-text completions endpoint answers a 1-token request; else why not (for the
        start-up line that says which prefill mode `auto` picked). No retries: a refusal is the answer."""
        body = {"model": self.api_model, "prompt": "Hello", "max_tokens": 1, "temperature": 0.0}
        try:
            with httpx.Client(headers=self._headers, timeout=self.limits.timeout_s) as http:
                _parse_choices(self.completions_url, http.post(self.completions_url, json=body), 0, True)
        except ApiAnswerError as e:
            return f"{self.completions_url} answered {e.message}"
        except httpx.TransportError as e:
            return f"{self.completions_url}: {_describe(e)}"
        return None

    def check(self) -> None:
        """One tiny call (blocking, with the same retries): a wrong URL, key or model fails at start-up."""
        body = {"model": self.api_model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        with httpx.Client(headers=self._headers, timeout=self.limits.timeout_s) as http:
            for attempt in range(1, self.limits.retry.max_attempts + 1):
                try:
                    response = http.post(self.url, json=body)
                    _parse_choices(self.url, response, 0)
                    return
                except (OpdError, httpx.TransportError) as e:
                    delay = self._retry_delay(e, attempt)
                    if delay is None:
                        raise _final_error(self.url, e, attempt) from e
                    log.warning("teacher API check failed (%s); retry in %.1f s", _describe(e), delay)
                    time.sleep(delay)

    async def _choices(
        self, body: dict, usage: ApiUsage, top_logprobs: int, raw_text: bool
    ) -> list[ApiChoice]:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limits.max_concurrency)
        url = self.completions_url if raw_text else self.url
        for attempt in range(1, self.limits.retry.max_attempts + 1):
            try:
                async with self._slots:
                    response = await self._http.post(url, json=body)
                answer, raw = _parse_choices(url, response, top_logprobs, raw_text)
                usage.add(raw)
                return answer
            except (OpdError, httpx.TransportError) as e:
                delay = self._retry_delay(e, attempt)
                if delay is None:
                    raise _final_error(url, e, attempt) from e
                usage.retries += 1
                log.warning(
                    "teacher API call failed (%s); retry %d/%d in %.1f s",
                    _describe(e),
                    attempt,
                    self.limits.retry.max_attempts - 1,
                    delay,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _retry_delay(self, error: Exception, attempt: int) -> float | None:
        """Seconds before the next try, or None to give up (not retryable, out of tries, or the API asked
        for a longer pause than our budget: then the caller is told to come back later instead)."""
        policy = self.limits.retry
        if attempt >= policy.max_attempts:
            return None
        if isinstance(error, ApiAnswerError):
            if not error.retryable:
                return None
            if error.retry_after is not None and error.retry_after > policy.max_backoff_s:
                return None
            return policy.delay(attempt, error.retry_after)
        return policy.delay(attempt)  # timeouts and transport errors

    async def aclose(self) -> None:
        await self._http.aclose()


async def gather_or_cancel(*aws: Awaitable[T]) -> list[T]:
    """Like asyncio.gather, but the first failure cancels the others: a request that has failed must not
    keep calling (and paying) the API in the background."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # let the cancelled ones close their calls
    for task in tasks:
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error
    return [task.result() for task in tasks]


class ApiAnswerError(OpdError):
    """One unusable answer from the API (internal to the retry loop; callers see _final_error's)."""

    def __init__(self, message: str, status: int, retryable: bool, retry_after: float | None = None):
        super().__init__(message, retry_after=retry_after)
        self.status = status
        self.retryable = retryable


def _parse_choices(
    url: str, response: httpx.Response, top_logprobs: int, raw_text: bool = False
) -> tuple[list[ApiChoice], dict]:
    """(choices, JSON body) of a 200 answer; ApiAnswerError for an error status or an unreadable answer."""
    status = response.status_code
    if status != 200:
        retryable = status in _RETRY_STATUSES or status >= 500
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        raise ApiAnswerError(f"HTTP {status}: {_snippet(response)!r}", status, retryable, retry_after)
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        raise ApiAnswerError(
            f"HTTP 200 but the body is not JSON: {_snippet(response)!r}", status, retryable=True
        ) from None
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices:
        raise ApiAnswerError(
            f"HTTP 200 but the answer has no 'choices' list: {_snippet(response)!r}", status, retryable=True
        )
    parse = _text_choice if raw_text else _choice
    return [parse(c, i, top_logprobs, status) for i, c in enumerate(choices)], body


def _text_choice(raw: object, i: int, top_logprobs: int, status: int) -> ApiChoice:
    """A choice of the raw-text endpoint: `text`, and logprobs in OpenAI's legacy format (parallel lists
    `tokens`, `token_logprobs`, `top_logprobs` of {token: logprob})."""
    choice = raw if isinstance(raw, dict) else {}
    text = choice.get("text")
    if not isinstance(text, str):
        raise ApiAnswerError(
            f"HTTP 200 but choices[{i}].text is {json.dumps(text)[:40]}, not a string", status, retryable=True
        )
    tokens = None
    logprobs = choice.get("logprobs")
    if top_logprobs and isinstance(logprobs, dict) and isinstance(logprobs.get("tokens"), list):
        chosen = logprobs.get("token_logprobs") or []
        tops = logprobs.get("top_logprobs") or []
        tokens = []
        for j, token in enumerate(logprobs["tokens"]):
            if not isinstance(token, str):
                continue
            top = tops[j] if j < len(tops) and isinstance(tops[j], dict) else {}
            entry = {
                "token": token,
                "logprob": chosen[j] if j < len(chosen) else None,
                "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top.items()],
            }
            tokens.append(_token(entry))
    return ApiChoice(text, choice.get("finish_reason"), tokens)


def _choice(raw: object, i: int, top_logprobs: int, status: int) -> ApiChoice:
    choice = raw if isinstance(raw, dict) else {}
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        # content: null happens for tool calls and refusals; a chunk needs text, so say which field is off.
        raise ApiAnswerError(
            f"HTTP 200 but choices[{i}].message.content is {json.dumps(content)[:40]}, not a string",
            status,
            retryable=True,
        )
    tokens = None
    if top_logprobs:
        logprobs = choice.get("logprobs")
        entries = logprobs.get("content") if isinstance(logprobs, dict) else None
        if isinstance(entries, list):  # APIs without logprobs leave them out: verification uses the text
            tokens = [_token(e) for e in entries if isinstance(e, dict) and isinstance(e.get("token"), str)]
    return ApiChoice(content, choice.get("finish_reason"), tokens)


def _token(entry: dict) -> TeacherToken:
    logprob = entry.get("logprob")
    logprob = float(logprob) if isinstance(logprob, int | float) else None
    alternatives: dict[str, float] = {}
    for alt in entry.get("top_logprobs") or []:
        if (
            isinstance(alt, dict)
            and isinstance(alt.get("token"), str)
            and isinstance(alt.get("logprob"), int | float)
        ):
            alternatives.setdefault(alt["token"], float(alt["logprob"]))
    if logprob is not None:
        alternatives.setdefault(entry["token"], logprob)
    return TeacherToken(entry["token"], logprob, alternatives)


def _final_error(url: str, error: Exception, attempts: int) -> OpdError:
    tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
    if isinstance(error, ApiAnswerError):
        where = f"the teacher API at {url} answered {error.message}"
        if error.status == 429:
            return Overloaded(f"{where} (rate limited; {tries})", retry_after=error.retry_after or 5.0)
        if error.status >= 500 or error.status in _RETRY_STATUSES:
            return Unavailable(f"{where} ({tries})", retry_after=error.retry_after or 2.0)
        if error.status in (401, 403):
            return UpstreamError(f"{where}: the API refused our key; check --api-key-env")
        return UpstreamError(f"{where} ({tries})")
    if isinstance(error, httpx.TimeoutException):
        return Unavailable(
            f"the teacher API at {url} did not answer in time ({type(error).__name__}; {tries})",
            retry_after=2.0,
        )
    if isinstance(error, httpx.TransportError):
        return Unavailable(
            f"cannot reach the teacher API at {url}: {_describe(error)} ({tries})", retry_after=2.0
        )
    return error if isinstance(error, OpdError) else UpstreamError(f"{url}: {error}")


def _describe(error: Exception) -> str:
    if isinstance(error, OpdError):
        return error.message
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _snippet(response: httpx.Response) -> str:
    text = " ".join(response.text.split())
    return text[:_SNIPPET] + ("..." if len(text) > _SNIPPET else "")


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) else 0
