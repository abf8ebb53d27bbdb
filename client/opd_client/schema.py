"""HTTP request/response models (pydantic), used by the service and its clients alike.

The wire schema's source is proto/opd/v1/teacher.proto; these models are its JSON face, mapped to the
proto messages by opd_client.convert. Range checks that depend on the served model (vocab size, max
top-k, token limits) are done by the service, where those limits are known.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

# dtype of the logprob arrays in a score answer; ids are always int32. Clients decode either to float32.
LogprobDtype = Literal["float32", "float16"]


class _Strict(BaseModel):
    # Unknown fields are errors: a typo like "topk" must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid")


class Sequence(_Strict):
    token_ids: list[StrictInt] = Field(description="prompt followed by completion")
    prompt_len: StrictInt = Field(description="completion positions are prompt_len <= t < len(token_ids)")
    teacher_prefix_ids: list[StrictInt] | None = Field(
        default=None,
        description="the teacher sees these ids instead of token_ids[:prompt_len] (privileged context)",
    )


class ScoreRequest(_Strict):
    model: StrictStr | None = Field(default=None, description="teacher name; default: the first one")
    sequences: list[Sequence]
    top_k: StrictInt
    temperature: StrictFloat | StrictInt | None = Field(default=None, description="default 1.0")
    score_ids: list[list[list[StrictInt]]] | None = Field(
        default=None, description="[S][T][M]: ids whose logprobs are returned at each completion position"
    )
    format: Literal["json", "binary"] = Field(
        default="json",
        description="binary: arrays as little-endian base64 with dtype and shape. Ignored when the "
        "request says `Accept: application/x-protobuf` (the answer is then an opd.v1.ScoreResponse)",
    )
    logprob_dtype: LogprobDtype = Field(
        default="float32",
        description="float16 halves the logprob bytes (~3 significant digits, |error| <= 2^-11·|x| + 2^-25); "
        "with format=json the numbers are the float16-rounded values. ids stay int32",
    )


class EncodedArray(BaseModel):
    """A dense little-endian array in base64 (the `binary` response format)."""

    dtype: Literal["int32", "float32", "float16"]
    shape: list[int]
    data: str


class SequenceScores(BaseModel):
    """Per completion position t (T = len(token_ids) - prompt_len)."""

    token_logprobs: list[float] | EncodedArray = Field(description="[T] logprob of the actual token")
    top_ids: list[list[int]] | EncodedArray = Field(description="[T, K] descending by logprob")
    top_logprobs: list[list[float]] | EncodedArray = Field(description="[T, K]")
    tail_logprobs: list[float] | EncodedArray = Field(description="[T] log(1 - sum of top-k p), finite")
    score_logprobs: list[list[float]] | EncodedArray | None = Field(default=None, description="[T, M]")


class Usage(BaseModel):
    scored_tokens: int
    forward_tokens: int


class ScoreResponse(BaseModel):
    model: str
    sequences: list[SequenceScores]
    usage: Usage


class ModelInfo(BaseModel):
    name: str
    revision: str
    vocab_size: int
    tokenizer_sha256: str
    max_top_k: int
    max_tokens: int
    max_sequence_len: int
    dtype: str
    device: str
    source: str


class ModelCard(ModelInfo):
    """One entry of GET /v1/models: OpenAI's list shape plus opd's fields."""

    id: str
    object: Literal["model"] = "model"
    owned_by: str = "opd"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ChatMessage(_Strict):
    role: StrictStr
    content: StrictStr


class TokenizeRequest(_Strict):
    model: StrictStr | None = None
    text: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: StrictBool = Field(
        default=True, description="with messages: end with the assistant turn's header"
    )
    add_special_tokens: StrictBool = Field(default=False, description="with text: add BOS/EOS if any")


class TokenizeResponse(BaseModel):
    model: str
    token_ids: list[int]
    text: str = Field(description="the text that was tokenized (the rendered chat template for messages)")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorBody(BaseModel):
    error: ErrorDetail


class HealthStatus(BaseModel):
    status: Literal["ok", "loading", "draining"]
