"""Errors shared by the teacher service and its clients.

Raised where the fact is known (with the request field and the limit in the message); the HTTP and gRPC
faces map them to a status through the two fields on each class, so the mapping lives in one place.
"""

from __future__ import annotations


class OpdError(Exception):
    """Base class: an error with an HTTP status, a gRPC status name and the offending field."""

    http_status = 500
    grpc_code = "INTERNAL"
    type = "server_error"

    def __init__(self, message: str, field: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after = retry_after

    def to_body(self) -> dict:
        """The error object in the shape OpenAI-compatible clients expect."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.field,
                "code": self.http_status,
            }
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, field={self.field!r})"


class InvalidRequest(OpdError):
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    type = "invalid_request_error"


class ValidationFailed(InvalidRequest):
    """Wrong types or missing fields (FastAPI's 422)."""

    http_status = 422


class Unauthenticated(OpdError):
    http_status = 401
    grpc_code = "UNAUTHENTICATED"
    type = "authentication_error"


class Forbidden(OpdError):
    """The key is right but the service does not offer this (e.g. weight updates are switched off)."""

    http_status = 403
    grpc_code = "PERMISSION_DENIED"
    type = "permission_error"


class NotFound(OpdError):
    http_status = 404
    grpc_code = "NOT_FOUND"
    type = "not_found_error"


class TooManyTokens(OpdError):
    # INVALID_ARGUMENT rather than RESOURCE_EXHAUSTED: resending the same request can never succeed,
    # and clients retry RESOURCE_EXHAUSTED.
    http_status = 413
    grpc_code = "INVALID_ARGUMENT"
    type = "invalid_request_error"


class Overloaded(OpdError):
    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    type = "rate_limit_error"


class Unavailable(OpdError):
    http_status = 503
    grpc_code = "UNAVAILABLE"
    type = "unavailable_error"


class DeadlineExceeded(OpdError):
    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"
    type = "timeout_error"


class UpstreamError(OpdError):
    """A black-box teacher's API gave an answer we cannot use (not JSON, fields missing, our request or key
    refused). Not retried by the clients; the trainer waits and resends like for an outage."""

    http_status = 502
    grpc_code = "INTERNAL"
    type = "upstream_error"


_BY_HTTP = {
    c.http_status: c
    for c in (
        InvalidRequest,
        ValidationFailed,
        Unauthenticated,
        Forbidden,
        NotFound,
        TooManyTokens,
        Overloaded,
        Unavailable,
        DeadlineExceeded,
        UpstreamError,
    )
}
_BY_GRPC = {
    "INVALID_ARGUMENT": InvalidRequest,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": Forbidden,
    "NOT_FOUND": NotFound,
    "RESOURCE_EXHAUSTED": Overloaded,
    "UNAVAILABLE": Unavailable,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
}


def error_for_http(
    status: int, message: str, field: str | None = None, retry_after: float | None = None
) -> OpdError:
    """The client-side exception for an HTTP error response."""
    cls = _BY_HTTP.get(status, OpdError)
    err = cls(message, field=field, retry_after=retry_after)
    if cls is OpdError:
        err.http_status = status
    return err


def error_for_grpc(
    code_name: str, message: str, field: str | None = None, retry_after: float | None = None
) -> OpdError:
    """The client-side exception for a gRPC status (code given by name, e.g. "NOT_FOUND")."""
    cls = _BY_GRPC.get(code_name, OpdError)
    return cls(message, field=field, retry_after=retry_after)
