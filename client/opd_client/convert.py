"""The one converter between the JSON face (opd_client.schema), the proto messages and arrays.

HTTP and gRPC both go through here, so a field added to the proto is mapped in exactly one place.
"""

from __future__ import annotations

import base64
from typing import cast

import numpy as np

from opd_client import schema
from opd_client.errors import InvalidRequest
from opd_client.scores import ScoreResult, SequenceScores
from opd_client.v1 import teacher_pb2 as pb

# (wire key, SequenceScores attribute, kind). Logprob fields travel in the request's logprob_dtype and
# hidden states in its hidden_dtype; both decode to float32, so trainers see one dtype whatever was on the
# wire. Ids are int32 throughout.
_SCORE_FIELDS = (
    ("token_logprobs", "token_logprobs_T", "logprob"),
    ("top_ids", "top_ids_T_K", "id"),
    ("top_logprobs", "top_logprobs_T_K", "logprob"),
    ("tail_logprobs", "tail_logprob_T", "logprob"),
    ("score_logprobs", "score_logprobs_T_M", "logprob"),
    ("hidden", "hidden_T_D", "hidden"),
)
LOGPROB_DTYPES = ("float32", "float16")
HIDDEN_DTYPES = schema.HIDDEN_DTYPES
# float16 overflows to -inf below -65504; such a logprob is probability 0 in any float, and a response
# never holds -inf, so it is clamped (only reachable with a tiny temperature: the tail floor is -87.3).
# Hidden states sent as float16 saturate the same way (bfloat16 has float32's range).
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_BFLOAT16_NAN = np.uint16(0x7FC0)


# ---- arrays -----------------------------------------------------------------------------------------


def wire_array(array: np.ndarray, dtype: str) -> np.ndarray:
    """`array` as the contiguous little-endian words every encoding below sends (bfloat16: uint16 words)."""
    if dtype == "bfloat16":
        return _bfloat16_words(array)
    if dtype == "float16":
        array = np.clip(array, -_FLOAT16_MAX, _FLOAT16_MAX)
    return np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<"))


def wire_values(array: np.ndarray, dtype: str) -> np.ndarray:
    """The numbers the wire carries for `array` in `dtype` (rounded to it), as a numpy array: JSON lists."""
    if dtype == "bfloat16":
        return _from_bytes(_bfloat16_words(array).tobytes(), "bfloat16", array.shape, "float32")
    return wire_array(array, dtype)


def _bfloat16_words(array: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as the high 16 bits of each float32."""
    values = np.ascontiguousarray(array, dtype="<f4")
    bits = values.view("<u4").astype(np.uint64)  # 64 bits: adding the rounding bias must not wrap
    words = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    return np.where(np.isnan(values), _BFLOAT16_NAN, words)  # NaN stays NaN whatever its payload


def _from_bytes(data: bytes, wire_dtype: str, shape, dtype: str) -> np.ndarray:
    """Decode little-endian `wire_dtype` words to `dtype` (bfloat16 exactly: shifted into the high half)."""
    if wire_dtype == "bfloat16":
        raw = (np.frombuffer(data, dtype="<u2").astype("<u4") << 16).view("<f4")
    else:
        raw = np.frombuffer(data, dtype=np.dtype(wire_dtype).newbyteorder("<"))
    return raw.reshape(tuple(shape)).astype(dtype)


def encode_array(array: np.ndarray, dtype: str) -> dict:
    """A little-endian base64 array with its dtype and shape (the `binary` JSON format)."""
    le = wire_array(array, dtype)
    return {"dtype": dtype, "shape": list(le.shape), "data": base64.b64encode(le.tobytes()).decode()}


def decode_array(value: dict | list, dtype: str) -> np.ndarray:
    """Inverse of encode_array (to `dtype` whatever the wire dtype); plain JSON lists are accepted too."""
    if isinstance(value, dict):
        return _from_bytes(base64.b64decode(value["data"]), value["dtype"], value["shape"], dtype)
    return np.asarray(value, dtype=dtype)


def tensor_to_proto(array: np.ndarray, dtype: str) -> pb.Tensor:
    le = wire_array(array, dtype)
    return pb.Tensor(dtype=dtype, shape=list(le.shape), data=le.tobytes())


def tensor_from_proto(tensor: pb.Tensor, dtype: str) -> np.ndarray:
    """The array in `dtype` (float16 and bfloat16 on the wire decode exactly to float32)."""
    return _from_bytes(tensor.data, tensor.dtype, tensor.shape, dtype)


def _wire_dtype(kind: str, logprob_dtype: str, hidden_dtype: str) -> str:
    if kind == "id":
        return "int32"
    if kind == "hidden":
        if hidden_dtype not in HIDDEN_DTYPES:
            raise ValueError(f"hidden_dtype = {hidden_dtype!r} must be one of {HIDDEN_DTYPES}")
        return hidden_dtype
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"logprob_dtype = {logprob_dtype!r} must be one of {LOGPROB_DTYPES}")
    return logprob_dtype


def _decoded_dtype(kind: str) -> str:
    return "int32" if kind == "id" else "float32"


# ---- scores -----------------------------------------------------------------------------------------


def scores_to_json(
    scores: SequenceScores,
    binary: bool = False,
    logprob_dtype: str = "float32",
    hidden_dtype: str = "float32",
) -> dict:
    """JSON lists, or base64 arrays with `binary`; with 16-bit dtypes the lists hold the rounded values."""
    out: dict[str, dict | list | None] = {}
    for key, attr, kind in _SCORE_FIELDS:
        array = getattr(scores, attr)
        if array is None:
            out[key] = None
            continue
        wire = _wire_dtype(kind, logprob_dtype, hidden_dtype)
        out[key] = encode_array(array, wire) if binary else wire_values(array, wire).tolist()
    return out


def scores_from_json(body: dict) -> SequenceScores:
    fields: dict[str, np.ndarray | None] = {}
    for key, attr, kind in _SCORE_FIELDS:
        value = body.get(key)
        fields[attr] = None if value is None else decode_array(value, _decoded_dtype(kind))
    # An empty completion decodes to shape (0,); keep [T, K] two-dimensional.
    for attr in ("top_ids_T_K", "top_logprobs_T_K", "score_logprobs_T_M"):
        array = fields[attr]
        if array is not None and array.ndim == 1:
            fields[attr] = array.reshape(0, 0)
    return SequenceScores(**fields)


def scores_to_proto(
    scores: SequenceScores, logprob_dtype: str = "float32", hidden_dtype: str = "float32"
) -> pb.SequenceScores:
    msg = pb.SequenceScores()
    for key, attr, kind in _SCORE_FIELDS:
        array = getattr(scores, attr)
        if array is not None:
            wire = _wire_dtype(kind, logprob_dtype, hidden_dtype)
            getattr(msg, key).CopyFrom(tensor_to_proto(array, wire))
    return msg


def scores_from_proto(msg: pb.SequenceScores) -> SequenceScores:
    fields = {}
    for key, attr, kind in _SCORE_FIELDS:
        present = msg.HasField(key)
        fields[attr] = tensor_from_proto(getattr(msg, key), _decoded_dtype(kind)) if present else None
    return SequenceScores(**fields)


def score_result_to_json(result: ScoreResult, binary: bool = False, logprob_dtype: str = "float32") -> dict:
    """The JSON body of POST /v1/score; `logprob_dtype` is the request's (float32 from the engine), the
    hidden states go in result.hidden_dtype."""
    hidden_dtype = result.hidden_dtype or "float32"
    return {
        "model": result.model,
        "sequences": [scores_to_json(s, binary, logprob_dtype, hidden_dtype) for s in result.sequences],
        "usage": {"scored_tokens": result.scored_tokens, "forward_tokens": result.forward_tokens},
        "hidden_dtype": result.hidden_dtype,
        "weights_version": result.weights_version,
    }


def score_result_from_json(body: dict) -> ScoreResult:
    return ScoreResult(
        model=body["model"],
        sequences=[scores_from_json(s) for s in body["sequences"]],
        scored_tokens=body["usage"]["scored_tokens"],
        forward_tokens=body["usage"]["forward_tokens"],
        hidden_dtype=body.get("hidden_dtype"),
        weights_version=body.get("weights_version"),
    )


def score_result_to_proto(result: ScoreResult, logprob_dtype: str = "float32") -> pb.ScoreResponse:
    """The gRPC answer, and the HTTP body under `Accept: application/x-protobuf`."""
    hidden_dtype = result.hidden_dtype or "float32"
    msg = pb.ScoreResponse(
        model=result.model,
        sequences=[scores_to_proto(s, logprob_dtype, hidden_dtype) for s in result.sequences],
        usage=pb.Usage(scored_tokens=result.scored_tokens, forward_tokens=result.forward_tokens),
    )
    if result.weights_version is not None:
        msg.weights_version = result.weights_version
    return msg


def score_result_from_proto(msg: pb.ScoreResponse) -> ScoreResult:
    # Each Tensor names its dtype; the hidden ones all carry the request's.
    hidden = [s.hidden.dtype for s in msg.sequences if s.HasField("hidden")]
    return ScoreResult(
        model=msg.model,
        sequences=[scores_from_proto(s) for s in msg.sequences],
        scored_tokens=msg.usage.scored_tokens,
        forward_tokens=msg.usage.forward_tokens,
        hidden_dtype=hidden[0] if hidden else None,
        weights_version=msg.weights_version if msg.HasField("weights_version") else None,
    )


# ---- requests ---------------------------------------------------------------------------------------


def score_request_to_proto(req: schema.ScoreRequest) -> pb.ScoreRequest:
    sequences = []
    for i, seq in enumerate(req.sequences):
        msg = pb.Sequence(token_ids=seq.token_ids, prompt_len=seq.prompt_len)
        if seq.teacher_prefix_ids is not None:
            msg.teacher_prefix_ids.CopyFrom(pb.TokenIds(ids=seq.teacher_prefix_ids))
        if req.score_ids is not None and i < len(req.score_ids):
            rows = req.score_ids[i]
            width = len(rows[0]) if rows else 0
            msg.num_score_ids = width
            msg.score_ids.extend(x for row in rows for x in row)
        sequences.append(msg)
    out = pb.ScoreRequest(
        model=req.model or "",
        sequences=sequences,
        top_k=req.top_k,
        logprob_dtype=req.logprob_dtype,
        return_hidden=req.return_hidden,
        hidden_dtype=req.hidden_dtype or "",
    )
    if req.temperature is not None:
        out.temperature = float(req.temperature)
    return out


def score_request_from_proto(msg: pb.ScoreRequest) -> schema.ScoreRequest:
    """The JSON-face request for a gRPC one, so both go through the same validation."""
    score_ids: list[list[list[int]]] | None = None
    if any(seq.num_score_ids or seq.score_ids for seq in msg.sequences):
        score_ids = []
        for i, seq in enumerate(msg.sequences):
            width, flat = seq.num_score_ids, list(seq.score_ids)
            if width == 0 and not flat:
                score_ids.append([])
                continue
            if width <= 0 or len(flat) % width:
                raise InvalidRequest(
                    f"sequences[{i}].score_ids has {len(flat)} ids, not a multiple of num_score_ids={width}",
                    field=f"sequences[{i}].score_ids",
                )
            score_ids.append([flat[j : j + width] for j in range(0, len(flat), width)])
    return schema.ScoreRequest(
        model=msg.model or None,
        sequences=[
            schema.Sequence(
                token_ids=list(seq.token_ids),
                prompt_len=seq.prompt_len,
                teacher_prefix_ids=list(seq.teacher_prefix_ids.ids)
                if seq.HasField("teacher_prefix_ids")
                else None,
            )
            for seq in msg.sequences
        ],
        top_k=msg.top_k,
        temperature=msg.temperature if msg.HasField("temperature") else None,
        score_ids=score_ids,
        # Empty is proto3's unset string: the default. Any other string is checked by the schema's Literal
        # when the model is built (an invalid one is the error naming the field), hence the cast.
        logprob_dtype=cast(schema.LogprobDtype, msg.logprob_dtype or "float32"),
        return_hidden=msg.return_hidden,
        hidden_dtype=msg.hidden_dtype or None,  # empty: the model's dtype
    )


# ModelInfo fields that are null in JSON and 0 / "" in the proto (proto3 scalars have no null).
_INFO_ZERO_IS_NULL = (
    "hidden_size",
    "head_sha256",
    "tokenizer_vocab_size",
    "max_hidden_bytes",
    "max_weights_bytes",
)


def model_info_to_proto(info: schema.ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(**{k: v for k, v in info.model_dump().items() if v is not None})


def model_info_from_proto(msg: pb.ModelInfo) -> schema.ModelInfo:
    fields = {}
    for name in schema.ModelInfo.model_fields:
        if msg.DESCRIPTOR.fields_by_name[name].has_presence and not msg.HasField(name):
            continue  # an unset `optional`: the schema's default
        value = getattr(msg, name)
        if name in _INFO_ZERO_IS_NULL and not value:
            continue
        fields[name] = value
    return schema.ModelInfo(**fields)


# ---- live weight updates ----------------------------------------------------------------------------


def weights_update_to_proto(update: schema.WeightsUpdate) -> pb.WeightsUpdate:
    return pb.WeightsUpdate(**update.model_dump())


def weights_update_from_proto(msg: pb.WeightsUpdate) -> schema.WeightsUpdate:
    return schema.WeightsUpdate(**{name: getattr(msg, name) for name in schema.WeightsUpdate.model_fields})


# ---- black-box chunk scoring ------------------------------------------------------------------------

# Tunables that are `optional` in the proto: unset there means the schema's default here.
_CHUNK_OPTIONAL = (
    "num_chunks",
    "chunk_tokens",
    "num_samples",
    "temperature",
    "similarity_threshold",
    "prior",
    "alpha",
    "top_logprobs",
    "continuation_tokens",
)


def chunk_request_to_proto(req: schema.ChunkScoreRequest) -> pb.ChunkScoreRequest:
    msg = pb.ChunkScoreRequest(
        model=req.model or "",
        messages=[pb.ChatMessage(role=m.role, content=m.content) for m in req.messages],
        completion=req.completion,
        entropies=req.entropies or [],
        return_samples=req.return_samples,
        return_teacher_tokens=req.return_teacher_tokens,
    )
    for name in _CHUNK_OPTIONAL:
        if getattr(req, name) is not None:
            setattr(msg, name, getattr(req, name))
    return msg


def chunk_request_from_proto(msg: pb.ChunkScoreRequest) -> schema.ChunkScoreRequest:
    """The JSON-face request for a gRPC one, so both go through the same validation."""
    given = {name: getattr(msg, name) for name in _CHUNK_OPTIONAL if msg.HasField(name)}
    return schema.ChunkScoreRequest(
        model=msg.model or None,
        messages=[schema.ChatMessage(role=m.role, content=m.content) for m in msg.messages],
        completion=list(msg.completion),
        # proto3 cannot tell an empty list from an unset one; zero entropies would pick nothing anyway.
        entropies=list(msg.entropies) or None,
        return_samples=msg.return_samples,
        return_teacher_tokens=msg.return_teacher_tokens,
        **given,
    )


def chunk_response_to_proto(resp: schema.ChunkScoreResponse) -> pb.ChunkScoreResponse:
    chunks = []
    for c in resp.chunks:
        fields = c.model_dump(exclude={"token_logprobs", "samples", "teacher_tokens"})
        chunk = pb.ChunkScore(**fields, samples=c.samples or [])
        chunk.token_logprobs.extend(float("nan") if x is None else x for x in c.token_logprobs)
        chunk.teacher_tokens.extend(
            pb.TeacherToken(
                text=t.text,
                logprob=float("nan") if t.logprob is None else t.logprob,
                top_tokens=t.top_tokens,
                top_logprobs=t.top_logprobs,
            )
            for t in c.teacher_tokens or []
        )
        chunks.append(chunk)
    return pb.ChunkScoreResponse(
        model=resp.model, chunks=chunks, usage=pb.ApiUsage(**resp.usage.model_dump())
    )


def chunk_response_from_proto(msg: pb.ChunkScoreResponse) -> schema.ChunkScoreResponse:
    chunks = []
    for c in msg.chunks:
        fields = {name: getattr(c, name) for name in schema.ChunkScore.model_fields}
        fields["token_logprobs"] = [None if x != x else float(x) for x in c.token_logprobs]  # NaN -> None
        fields["samples"] = list(c.samples) or None
        # proto3 has no null list: an empty one means the API gave no tokens (the JSON face's null).
        fields["teacher_tokens"] = [
            schema.TeacherToken(
                text=t.text,
                logprob=None if t.logprob != t.logprob else t.logprob,
                top_tokens=list(t.top_tokens),
                top_logprobs=list(t.top_logprobs),
            )
            for t in c.teacher_tokens
        ] or None
        chunks.append(schema.ChunkScore(**fields))
    usage = schema.ApiUsage(**{name: getattr(msg.usage, name) for name in schema.ApiUsage.model_fields})
    return schema.ChunkScoreResponse(model=msg.model, chunks=chunks, usage=usage)
