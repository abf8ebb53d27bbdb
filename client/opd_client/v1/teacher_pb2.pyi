from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "revision", "vocab_size", "tokenizer_sha256", "max_top_k", "max_tokens", "max_sequence_len", "dtype", "device", "source", "black_box", "hidden_size", "head_sha256", "logit_scale", "final_logit_softcapping", "tokenizer_vocab_size", "max_hidden_bytes", "weights_version", "max_weights_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_SHA256_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LEN_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    BLACK_BOX_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    HEAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    LOGIT_SCALE_FIELD_NUMBER: _ClassVar[int]
    FINAL_LOGIT_SOFTCAPPING_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_HIDDEN_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHTS_BYTES_FIELD_NUMBER: _ClassVar[int]
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
    black_box: bool
    hidden_size: int
    head_sha256: str
    logit_scale: float
    final_logit_softcapping: float
    tokenizer_vocab_size: int
    max_hidden_bytes: int
    weights_version: int
    max_weights_bytes: int
    def __init__(self, name: _Optional[str] = ..., revision: _Optional[str] = ..., vocab_size: _Optional[int] = ..., tokenizer_sha256: _Optional[str] = ..., max_top_k: _Optional[int] = ..., max_tokens: _Optional[int] = ..., max_sequence_len: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., source: _Optional[str] = ..., black_box: _Optional[bool] = ..., hidden_size: _Optional[int] = ..., head_sha256: _Optional[str] = ..., logit_scale: _Optional[float] = ..., final_logit_softcapping: _Optional[float] = ..., tokenizer_vocab_size: _Optional[int] = ..., max_hidden_bytes: _Optional[int] = ..., weights_version: _Optional[int] = ..., max_weights_bytes: _Optional[int] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class Sequence(_message.Message):
    __slots__ = ("token_ids", "prompt_len", "teacher_prefix_ids", "score_ids", "num_score_ids")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LEN_FIELD_NUMBER: _ClassVar[int]
    TEACHER_PREFIX_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORE_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_SCORE_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_len: int
    teacher_prefix_ids: TokenIds
    score_ids: _containers.RepeatedScalarFieldContainer[int]
    num_score_ids: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., prompt_len: _Optional[int] = ..., teacher_prefix_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., score_ids: _Optional[_Iterable[int]] = ..., num_score_ids: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("model", "sequences", "top_k", "temperature", "logprob_dtype", "return_hidden", "hidden_dtype")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_DTYPE_FIELD_NUMBER: _ClassVar[int]
    RETURN_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_DTYPE_FIELD_NUMBER: _ClassVar[int]
    model: str
    sequences: _containers.RepeatedCompositeFieldContainer[Sequence]
    top_k: int
    temperature: float
    logprob_dtype: str
    return_hidden: bool
    hidden_dtype: str
    def __init__(self, model: _Optional[str] = ..., sequences: _Optional[_Iterable[_Union[Sequence, _Mapping]]] = ..., top_k: _Optional[int] = ..., temperature: _Optional[float] = ..., logprob_dtype: _Optional[str] = ..., return_hidden: _Optional[bool] = ..., hidden_dtype: _Optional[str] = ...) -> None: ...

class SequenceScores(_message.Message):
    __slots__ = ("token_logprobs", "top_ids", "top_logprobs", "tail_logprobs", "score_logprobs", "hidden")
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TAIL_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SCORE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    token_logprobs: Tensor
    top_ids: Tensor
    top_logprobs: Tensor
    tail_logprobs: Tensor
    score_logprobs: Tensor
    hidden: Tensor
    def __init__(self, token_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., top_ids: _Optional[_Union[Tensor, _Mapping]] = ..., top_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., tail_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., score_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("scored_tokens", "forward_tokens")
    SCORED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    scored_tokens: int
    forward_tokens: int
    def __init__(self, scored_tokens: _Optional[int] = ..., forward_tokens: _Optional[int] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("model", "sequences", "usage", "weights_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceScores]
    usage: Usage
    weights_version: int
    def __init__(self, model: _Optional[str] = ..., sequences: _Optional[_Iterable[_Union[SequenceScores, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., weights_version: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("grpc_code", "http_status", "field", "message")
    GRPC_CODE_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    grpc_code: int
    http_status: int
    field: str
    message: str
    def __init__(self, grpc_code: _Optional[int] = ..., http_status: _Optional[int] = ..., field: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ScoreStreamRequest(_message.Message):
    __slots__ = ("request_id", "request")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    request: ScoreRequest
    def __init__(self, request_id: _Optional[str] = ..., request: _Optional[_Union[ScoreRequest, _Mapping]] = ...) -> None: ...

class ScoreStreamResponse(_message.Message):
    __slots__ = ("request_id", "response", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    response: ScoreResponse
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., response: _Optional[_Union[ScoreResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class GetHeadRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class HeadChunk(_message.Message):
    __slots__ = ("model", "sha256", "total_bytes", "offset", "data")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    model: str
    sha256: str
    total_bytes: int
    offset: int
    data: bytes
    def __init__(self, model: _Optional[str] = ..., sha256: _Optional[str] = ..., total_bytes: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class WeightsChunk(_message.Message):
    __slots__ = ("model", "data", "all_tensors")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ALL_TENSORS_FIELD_NUMBER: _ClassVar[int]
    model: str
    data: bytes
    all_tensors: bool
    def __init__(self, model: _Optional[str] = ..., data: _Optional[bytes] = ..., all_tensors: _Optional[bool] = ...) -> None: ...

class ReloadWeightsRequest(_message.Message):
    __slots__ = ("model", "path", "all_tensors")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ALL_TENSORS_FIELD_NUMBER: _ClassVar[int]
    model: str
    path: str
    all_tensors: bool
    def __init__(self, model: _Optional[str] = ..., path: _Optional[str] = ..., all_tensors: _Optional[bool] = ...) -> None: ...

class WeightsUpdate(_message.Message):
    __slots__ = ("model", "weights_version", "previous_version", "tensors", "bytes", "source", "load_s", "swap_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LOAD_S_FIELD_NUMBER: _ClassVar[int]
    SWAP_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    weights_version: int
    previous_version: int
    tensors: int
    bytes: int
    source: str
    load_s: float
    swap_s: float
    def __init__(self, model: _Optional[str] = ..., weights_version: _Optional[int] = ..., previous_version: _Optional[int] = ..., tensors: _Optional[int] = ..., bytes: _Optional[int] = ..., source: _Optional[str] = ..., load_s: _Optional[float] = ..., swap_s: _Optional[float] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChunkScoreRequest(_message.Message):
    __slots__ = ("model", "messages", "completion", "entropies", "num_chunks", "chunk_tokens", "num_samples", "temperature", "similarity_threshold", "prior", "alpha", "top_logprobs", "return_samples", "continuation_tokens", "return_teacher_tokens")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    ENTROPIES_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PRIOR_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RETURN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RETURN_TEACHER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    completion: _containers.RepeatedScalarFieldContainer[str]
    entropies: _containers.RepeatedScalarFieldContainer[float]
    num_chunks: int
    chunk_tokens: int
    num_samples: int
    temperature: float
    similarity_threshold: float
    prior: float
    alpha: float
    top_logprobs: int
    return_samples: bool
    continuation_tokens: int
    return_teacher_tokens: bool
    def __init__(self, model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., completion: _Optional[_Iterable[str]] = ..., entropies: _Optional[_Iterable[float]] = ..., num_chunks: _Optional[int] = ..., chunk_tokens: _Optional[int] = ..., num_samples: _Optional[int] = ..., temperature: _Optional[float] = ..., similarity_threshold: _Optional[float] = ..., prior: _Optional[float] = ..., alpha: _Optional[float] = ..., top_logprobs: _Optional[int] = ..., return_samples: _Optional[bool] = ..., continuation_tokens: _Optional[int] = ..., return_teacher_tokens: _Optional[bool] = ...) -> None: ...

class TeacherToken(_message.Message):
    __slots__ = ("text", "logprob", "top_tokens", "top_logprobs")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    text: str
    logprob: float
    top_tokens: _containers.RepeatedScalarFieldContainer[str]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, text: _Optional[str] = ..., logprob: _Optional[float] = ..., top_tokens: _Optional[_Iterable[str]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class ChunkScore(_message.Message):
    __slots__ = ("start", "end", "text", "similarity", "similarity_max", "edit_similarity", "edit_similarity_max", "matches", "reward", "accepted_tokens", "token_logprobs", "greedy", "samples", "teacher_tokens")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_MAX_FIELD_NUMBER: _ClassVar[int]
    EDIT_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    EDIT_SIMILARITY_MAX_FIELD_NUMBER: _ClassVar[int]
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    GREEDY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TEACHER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    text: str
    similarity: float
    similarity_max: float
    edit_similarity: float
    edit_similarity_max: float
    matches: int
    reward: float
    accepted_tokens: int
    token_logprobs: _containers.RepeatedScalarFieldContainer[float]
    greedy: str
    samples: _containers.RepeatedScalarFieldContainer[str]
    teacher_tokens: _containers.RepeatedCompositeFieldContainer[TeacherToken]
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., text: _Optional[str] = ..., similarity: _Optional[float] = ..., similarity_max: _Optional[float] = ..., edit_similarity: _Optional[float] = ..., edit_similarity_max: _Optional[float] = ..., matches: _Optional[int] = ..., reward: _Optional[float] = ..., accepted_tokens: _Optional[int] = ..., token_logprobs: _Optional[_Iterable[float]] = ..., greedy: _Optional[str] = ..., samples: _Optional[_Iterable[str]] = ..., teacher_tokens: _Optional[_Iterable[_Union[TeacherToken, _Mapping]]] = ...) -> None: ...

class ApiUsage(_message.Message):
    __slots__ = ("requests", "prompt_tokens", "completion_tokens", "retries")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    requests: int
    prompt_tokens: int
    completion_tokens: int
    retries: int
    def __init__(self, requests: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., retries: _Optional[int] = ...) -> None: ...

class ChunkScoreResponse(_message.Message):
    __slots__ = ("model", "chunks", "usage")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    model: str
    chunks: _containers.RepeatedCompositeFieldContainer[ChunkScore]
    usage: ApiUsage
    def __init__(self, model: _Optional[str] = ..., chunks: _Optional[_Iterable[_Union[ChunkScore, _Mapping]]] = ..., usage: _Optional[_Union[ApiUsage, _Mapping]] = ...) -> None: ...

class TextSequence(_message.Message):
    __slots__ = ("messages", "prompt", "completion", "completion_ends")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_ENDS_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    prompt: str
    completion: str
    completion_ends: bool
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., prompt: _Optional[str] = ..., completion: _Optional[str] = ..., completion_ends: _Optional[bool] = ...) -> None: ...

class ScoreTextRequest(_message.Message):
    __slots__ = ("model", "sequences", "top_k", "temperature")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    model: str
    sequences: _containers.RepeatedCompositeFieldContainer[TextSequence]
    top_k: int
    temperature: float
    def __init__(self, model: _Optional[str] = ..., sequences: _Optional[_Iterable[_Union[TextSequence, _Mapping]]] = ..., top_k: _Optional[int] = ..., temperature: _Optional[float] = ...) -> None: ...

class TextSequenceScores(_message.Message):
    __slots__ = ("token_ids", "tokens", "token_logprobs", "byte_starts", "byte_ends", "completion_bytes", "prompt_tokens", "top_k", "top_tokens", "top_logprobs", "tail_logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    BYTE_STARTS_FIELD_NUMBER: _ClassVar[int]
    BYTE_ENDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TAIL_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    token_logprobs: _containers.RepeatedScalarFieldContainer[float]
    byte_starts: _containers.RepeatedScalarFieldContainer[int]
    byte_ends: _containers.RepeatedScalarFieldContainer[int]
    completion_bytes: int
    prompt_tokens: int
    top_k: int
    top_tokens: _containers.RepeatedScalarFieldContainer[str]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    tail_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ..., token_logprobs: _Optional[_Iterable[float]] = ..., byte_starts: _Optional[_Iterable[int]] = ..., byte_ends: _Optional[_Iterable[int]] = ..., completion_bytes: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., top_k: _Optional[int] = ..., top_tokens: _Optional[_Iterable[str]] = ..., top_logprobs: _Optional[_Iterable[float]] = ..., tail_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreTextResponse(_message.Message):
    __slots__ = ("model", "sequences", "usage")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    model: str
    sequences: _containers.RepeatedCompositeFieldContainer[TextSequenceScores]
    usage: Usage
    def __init__(self, model: _Optional[str] = ..., sequences: _Optional[_Iterable[_Union[TextSequenceScores, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...
