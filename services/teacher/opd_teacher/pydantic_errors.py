"""pydantic validation errors as OpdErrors that name the field, for both faces (HTTP and gRPC)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from opd_client.errors import ValidationFailed

# pydantic's markers for the branch of a union that failed, not fields a user would recognise
_UNION_MARKERS = ("list[int]", "int", "float", "str")


def field_path(loc: tuple) -> str:
    """('body', 'sequences', 0, 'token_ids', 3) -> 'sequences[0].token_ids[3]'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_MARKERS:
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def validation_failed(errors: Sequence[Mapping[str, Any]]) -> ValidationFailed:
    """The first problem with its field and the offending value, and how many more there are (pydantic's
    ErrorDetails, or FastAPI's RequestValidationError.errors())."""
    first: Mapping[str, Any] = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = field_path(tuple(first.get("loc", ())))
    got = "" if first.get("type") == "missing" else f" (got {str(first.get('input'))[:60]!r})"
    more = f"; and {len(errors) - 1} more problem(s)" if len(errors) > 1 else ""
    return ValidationFailed(f"{field or 'body'}: {first.get('msg')}{got}{more}", field=field or "body")
