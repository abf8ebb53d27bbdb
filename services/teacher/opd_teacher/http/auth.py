"""Bearer-key auth as ASGI middleware, so it covers every route (docs and unknown paths too)."""

from __future__ import annotations

import hmac

from opd_client.errors import Unauthenticated
from opd_teacher.http.errors import error_response

# Health checks and Prometheus scrapes come from kubelets and scrapers that hold no key. /metrics holds
# counts and timings only, never request content; keep it off the public network (NetworkPolicy).
OPEN_PREFIXES = ("/health/", "/health", "/v2/health/", "/metrics")


class BearerAuth:
    def __init__(self, app, api_keys: set[str]):
        self.app = app
        self.api_keys = [k.encode() for k in api_keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.api_keys or scope["path"].startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        problem = self._problem(dict(scope["headers"]).get(b"authorization"))
        if problem is None:
            return await self.app(scope, receive, send)
        await error_response(Unauthenticated(problem, field="Authorization"))(scope, receive, send)

    def _problem(self, header: bytes | None) -> str | None:
        if not header:
            return "missing Authorization header; send 'Authorization: Bearer <key>'"
        scheme, _, key = header.partition(b" ")
        if scheme.lower() != b"bearer" or not key:
            return "the Authorization header must be 'Bearer <key>'"
        # compare against every key so timing does not reveal which prefix matched
        if not any([hmac.compare_digest(key.strip(), k) for k in self.api_keys]):
            return "wrong API key"
        return None
