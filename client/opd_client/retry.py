"""Retries with exponential backoff and jitter that honour the server's Retry-After hint."""

from __future__ import annotations

import random
from dataclasses import dataclass

from opd_client.errors import DeadlineExceeded, OpdError, Overloaded, Unavailable

# Errors worth another try: the server is busy, starting, draining or briefly unreachable.
RETRYABLE = (Overloaded, Unavailable, DeadlineExceeded)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6  # first try included; 1 disables retries
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2  # ± fraction, so many clients do not retry in lockstep
    retry_connect_errors: bool = True

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before try number attempt + 1 (attempt counts from 1)."""
        backoff = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        backoff *= 1 + random.uniform(-self.jitter, self.jitter)
        if retry_after is not None:
            # The server knows its queue: never come back earlier than it asked.
            backoff = max(backoff, min(retry_after, self.max_backoff_s))
        return max(0.0, backoff)

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        if attempt >= self.max_attempts:
            return False
        if isinstance(error, OpdError):
            return isinstance(error, RETRYABLE)
        return self.retry_connect_errors  # transport errors (refused, reset, timed out)


NO_RETRY = RetryPolicy(max_attempts=1)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header value (delta-seconds form; HTTP dates are rare for 429/503)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from datetime import datetime, timezone
        from email.utils import parsedate_to_datetime

        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
