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
# dtype of the hidden states (return_hidden) on the wire; clients decode any to float32. bfloat16 has no
# numpy dtype: its arrays are 2-byte little-endian words, the high half of the float32 with that value.
HIDDEN_DTYPES = ("float32", "bfloat16", "float16")


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
    return_hidden: StrictBool = Field(
        default=False,
        description="also return `hidden` [T, D] per sequence: the teacher's final hidden states, which with "
        "its head (GET /v1/models/{name}/head) give the full distribution. top_k may then be 0 (no logprobs)",
    )
    # A string checked by the service (400 naming the field), not a Literal (a 422 from the schema).
    hidden_dtype: StrictStr | None = Field(
        default=None,
        description="dtype of `hidden` on the wire: float32, bfloat16 or float16; default: the model's dtype",
    )


class EncodedArray(BaseModel):
    """A dense little-endian array in base64 (the `binary` response format)."""

    dtype: Literal["int32", "float32", "float16", "bfloat16"]
    shape: list[int]
    data: str


class SequenceScores(BaseModel):
    """Per completion position t (T = len(token_ids) - prompt_len); the four logprob fields are null when
    the request had top_k = 0 (return_hidden only)."""

    token_logprobs: list[float] | EncodedArray | None = Field(
        default=None, description="[T] logprob of the actual token"
    )
    top_ids: list[list[int]] | EncodedArray | None = Field(default=None, description="[T, K] descending")
    top_logprobs: list[list[float]] | EncodedArray | None = Field(default=None, description="[T, K]")
    tail_logprobs: list[float] | EncodedArray | None = Field(
        default=None, description="[T] log(1 - sum of top-k p), finite"
    )
    score_logprobs: list[list[float]] | EncodedArray | None = Field(default=None, description="[T, M]")
    hidden: list[list[float]] | EncodedArray | None = Field(
        default=None,
        description="[T, D] with return_hidden: row t is the teacher's final hidden state (after its final "
        "norm) at the position predicting completion token t, in the request's hidden_dtype",
    )


class Usage(BaseModel):
    scored_tokens: int
    forward_tokens: int


class ScoreResponse(BaseModel):
    model: str
    sequences: list[SequenceScores]
    usage: Usage
    hidden_dtype: str | None = Field(default=None, description="the dtype of `hidden`; null without it")
    weights_version: int | None = Field(
        default=None,
        description="the teacher weights these numbers were computed with: 0 as loaded, +1 per live update "
        "(PUT /v1/models/{name}/weights, POST .../reload)",
    )


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
    black_box: bool = Field(
        default=False,
        description="an OpenAI-compatible API teacher: POST /v1/chunk-score only (no logprobs of given ids)",
    )
    # What turns a hidden state into logits, with the head of GET /v1/models/{name}/head (docs/api.md):
    # logits = (h · weightᵀ + bias) · logit_scale, then tanh(x / c) · c with c = final_logit_softcapping.
    hidden_size: int | None = Field(
        default=None, description="D of `hidden`; null: this teacher gives no hidden states"
    )
    head_sha256: str | None = Field(
        default=None, description="sha256 of the head's safetensors bytes (null without hidden states)"
    )
    logit_scale: float = Field(default=1.0, description="logits = (h · weightᵀ + bias) · logit_scale")
    final_logit_softcapping: float | None = Field(
        default=None, description="c: logits become tanh(logits / c) · c (Gemma 2); null: none"
    )
    tokenizer_vocab_size: int | None = Field(
        default=None,
        description="len(tokenizer); head rows from here to vocab_size are padding the tokenizer never emits",
    )
    max_hidden_bytes: int | None = Field(
        default=None,
        description="per request with return_hidden: scored tokens × hidden_size × bytes per value, summed "
        "over its sequences; null without hidden states",
    )
    weights_version: int | None = Field(
        default=None,
        description="the weights served now: 0 as loaded, +1 per live update; null for a black-box teacher",
    )
    max_weights_bytes: int | None = Field(
        default=None,
        description="the largest body PUT /v1/models/{name}/weights takes; null: live updates are off",
    )


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


class ChunkScoreRequest(_Strict):
    """Black-box scoring of one student completion (POST /v1/chunk-score, gRPC ChunkScore)."""

    model: StrictStr | None = Field(default=None, description="teacher name; default: the first one")
    messages: list[ChatMessage] = Field(description="the chat prompt as the teacher sees it")
    completion: list[StrictStr] = Field(
        description="the student's completion, one string per student token; their concatenation is the "
        "completion text (a special token such as the final EOS is an empty string)"
    )
    entropies: list[StrictFloat | StrictInt] | None = Field(
        default=None,
        description="the student's entropy at each completion token: chunks start at the highest ones. "
        "Without them chunks are spread evenly",
    )
    num_chunks: StrictInt = Field(
        default=4, description="M: chunks scored (fewer if the completion is short)"
    )
    chunk_tokens: StrictInt = Field(default=8, description="C: student tokens per chunk")
    num_samples: StrictInt = Field(
        default=4,
        description="N: teacher samples per chunk (0: none; the chunk gets only the greedy continuation, "
        "its similarities are 0 and its reward the prior's)",
    )
    temperature: StrictFloat | StrictInt = Field(
        default=1.0, description="the teacher's sampling temperature"
    )
    similarity_threshold: StrictFloat | StrictInt = Field(
        default=0.7, description="embedding cosine at or above which a teacher sample counts as a match"
    )
    prior: StrictFloat | StrictInt = Field(default=0.5, description="the reward's prior share of matches")
    alpha: StrictFloat | StrictInt = Field(default=1.0, description="the prior's weight in pseudo-samples")
    top_logprobs: StrictInt = Field(
        default=5, description="alternatives asked per greedy token for the verification logprobs (0-20)"
    )
    return_samples: StrictBool = Field(
        default=False, description="include the teacher's samples in the answer"
    )
    continuation_tokens: StrictInt | None = Field(
        default=None,
        description="tokens of the teacher's greedy continuation of each chunk's prefix (default: the chunk's "
        "length); longer ones give more teacher positions per call",
    )
    return_teacher_tokens: StrictBool = Field(
        default=False,
        description="include each greedy continuation's tokens with their top_logprobs (teacher_tokens)",
    )


class TeacherToken(BaseModel):
    """One token of a black-box teacher's continuation as its API reported it: text, not ids."""

    text: str
    logprob: float | None = Field(default=None, description="the teacher's logprob of it (null: not given)")
    top_tokens: list[str] = Field(default_factory=list, description="its top_logprobs, most likely first")
    top_logprobs: list[float] = Field(default_factory=list)


class ChunkScore(BaseModel):
    """One chunk [start, end) of the student's completion (student token positions) and the teacher's verdict."""

    start: int
    end: int
    text: str = Field(description="the student's chunk")
    similarity: float = Field(description="mean embedding cosine of the N teacher samples to the chunk")
    similarity_max: float
    edit_similarity: float = Field(description="mean normalised character edit similarity (1 - lev/max len)")
    edit_similarity_max: float
    matches: int = Field(description="k: teacher samples with cosine >= similarity_threshold")
    reward: float = Field(description="(k + alpha * prior) / (N + alpha)")
    accepted_tokens: int = Field(description="leading chunk tokens the teacher's greedy continuation accepts")
    token_logprobs: list[float | None] = Field(
        description="per chunk token, the teacher's logprob of it where its top_logprobs tell it (else null)"
    )
    greedy: str = Field(description="the teacher's greedy continuation of the chunk's prefix")
    samples: list[str] | None = None
    teacher_tokens: list[TeacherToken] | None = Field(
        default=None,
        description="with return_teacher_tokens: the greedy continuation token by token, each with the "
        "API's top_logprobs (null when the API gave no logprobs)",
    )


class ApiUsage(BaseModel):
    """What a black-box request cost at the teacher's API."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0


class ChunkScoreResponse(BaseModel):
    model: str
    chunks: list[ChunkScore]
    usage: ApiUsage


class TextSequence(_Strict):
    """One prompt + completion as text, for a teacher whose tokenizer may differ from the caller's."""

    messages: list[ChatMessage] | None = Field(
        default=None,
        description="the prompt as a chat, rendered with the teacher's own chat template and its "
        "generation prompt (exactly one of messages and prompt)",
    )
    prompt: StrictStr | None = Field(
        default=None,
        description="the prompt as raw text, tokenized as is with the tokenizer's BOS if it adds one",
    )
    completion: StrictStr = Field(description="the text to score; the teacher tokenizes it its own way")
    completion_ends: StrictBool = Field(
        default=False,
        description="the completion ends the teacher's turn: its end-of-turn token (the one its chat template "
        "closes a turn with, else EOS) is appended and scored, with the empty byte span [n, n) at the end",
    )


class ScoreTextRequest(_Strict):
    """POST /v1/score-text, gRPC ScoreText: the teacher's logprobs of its own tokens of each completion."""

    model: StrictStr | None = Field(default=None, description="teacher name; default: the first one")
    sequences: list[TextSequence]
    top_k: StrictInt = Field(
        default=0, description="also the top-k tokens per position, as strings (0: none)"
    )
    temperature: StrictFloat | StrictInt | None = Field(default=None, description="default 1.0")


class TextSequenceScores(BaseModel):
    """Per teacher token t of the completion (T of them, the end-of-turn token last if asked)."""

    token_ids: list[int] = Field(description="[T] the teacher's token ids")
    tokens: list[str] = Field(
        description="[T] each token's text (a special token by its name; a piece of a multi-byte character "
        "holds U+FFFD)"
    )
    token_logprobs: list[float] = Field(description="[T] the teacher's logprob of each token")
    byte_spans: list[list[int]] = Field(
        description="[T][2] each token's [start, end) in the completion's UTF-8 bytes; they tile "
        "[0, completion_bytes) in order, each byte in exactly one token (special tokens: empty spans)"
    )
    completion_bytes: int = Field(description="len(completion.encode('utf-8'))")
    prompt_tokens: int = Field(description="the teacher's tokens of the prompt")
    top_tokens: list[list[str]] | None = Field(
        default=None, description="[T][K] as strings, most likely first"
    )
    top_logprobs: list[list[float]] | None = Field(default=None, description="[T][K]")
    tail_logprobs: list[float] | None = Field(default=None, description="[T] log(1 - sum of top-k p), finite")


class ScoreTextResponse(BaseModel):
    model: str
    sequences: list[TextSequenceScores]
    usage: Usage


class ReloadRequest(_Strict):
    """POST /v1/models/{name}/reload: new weights from a file or directory the service can read."""

    path: StrictStr = Field(
        description="absolute path of a .safetensors file or a directory of *.safetensors shards (all tensors "
        "or some, named as in the model's state_dict)"
    )
    all_tensors: StrictBool = Field(
        default=False, description="refuse an update that does not replace every tensor of the model"
    )


class WeightsUpdate(BaseModel):
    """The answer to a weight push or reload: the version now served."""

    model: str
    weights_version: int = Field(description="the version every later score answer names")
    previous_version: int
    tensors: int = Field(description="tensors the update gave")
    bytes: int = Field(description="bytes of tensor data read")
    source: str = Field(description='"push", or the reloaded path')
    load_s: float = Field(description="seconds reading and checking the tensors (forwards went on meanwhile)")
    swap_s: float = Field(description="seconds forwards waited while the new tensors were copied in")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorBody(BaseModel):
    error: ErrorDetail


class HealthStatus(BaseModel):
    status: Literal["ok", "loading", "draining"]
