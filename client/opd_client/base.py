"""The one interface every teacher client offers (HTTP sync, HTTP async, gRPC), and shared helpers."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Literal, Protocol

from opd_client import schema
from opd_client.scores import ScoreResult

if TYPE_CHECKING:  # opd_client.head imports torch; nothing else in the client does
    from opd_client.head import TeacherHead

SequenceLike = schema.Sequence | dict


def make_score_request(
    sequences: Seq[SequenceLike],
    top_k: int,
    *,
    temperature: float | None = None,
    score_ids: list | None = None,
    model: str | None = None,
    format: Literal["json", "binary"] = "json",
    return_hidden: bool = False,
    hidden_dtype: str | None = None,
) -> schema.ScoreRequest:
    """Build (and type-check) a score request; sequences may be dicts with token_ids/prompt_len."""
    return schema.ScoreRequest(
        model=model,
        sequences=[s if isinstance(s, schema.Sequence) else schema.Sequence(**s) for s in sequences],
        top_k=top_k,
        temperature=temperature,
        score_ids=[[list(map(int, row)) for row in rows] for rows in score_ids]
        if score_ids is not None
        else None,
        format=format,
        return_hidden=return_hidden,
        hidden_dtype=hidden_dtype,
    )


class TeacherClient(Protocol):
    """Sync interface; AsyncHttpTeacherClient offers the same methods as coroutines."""

    def ready(self) -> bool: ...

    def models(self) -> list[schema.ModelInfo]: ...

    def tokenize(
        self,
        text: str | None = None,
        messages: list[dict] | None = None,
        model: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]: ...

    def score(
        self,
        sequences: Seq[SequenceLike],
        top_k: int,
        *,
        temperature: float | None = None,
        score_ids: list | None = None,
        model: str | None = None,
        logprob_dtype: schema.LogprobDtype = "float32",
        return_hidden: bool = False,
        hidden_dtype: str | None = None,
    ) -> ScoreResult: ...

    def teacher_head(self, name: str | None = None) -> TeacherHead: ...

    def close(self) -> None: ...
