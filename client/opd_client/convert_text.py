"""Text scoring (POST /v1/score-text, gRPC ScoreText) between its JSON face (opd_client.schema) and the
proto messages: the one place these messages are mapped, beside convert.py's score and chunk messages."""

from __future__ import annotations

from opd_client import schema
from opd_client.v1 import teacher_pb2 as pb


def request_to_proto(req: schema.ScoreTextRequest) -> pb.ScoreTextRequest:
    msg = pb.ScoreTextRequest(model=req.model or "", top_k=req.top_k)
    if req.temperature is not None:
        msg.temperature = float(req.temperature)
    for seq in req.sequences:
        item = msg.sequences.add(completion=seq.completion, completion_ends=seq.completion_ends)
        if seq.messages is not None:
            item.messages.extend(pb.ChatMessage(role=m.role, content=m.content) for m in seq.messages)
        if seq.prompt is not None:
            item.prompt = seq.prompt
    return msg


def request_from_proto(msg: pb.ScoreTextRequest) -> schema.ScoreTextRequest:
    """The JSON-face request for a gRPC one, so both go through the same validation. proto3 cannot tell an
    empty messages list from an unset one: no messages and no prompt is "no messages" (the service's 400)."""
    sequences = [
        schema.TextSequence(
            messages=[schema.ChatMessage(role=m.role, content=m.content) for m in s.messages] or None,
            prompt=s.prompt if s.HasField("prompt") else None,
            completion=s.completion,
            completion_ends=s.completion_ends,
        )
        for s in msg.sequences
    ]
    return schema.ScoreTextRequest(
        model=msg.model or None,
        sequences=sequences,
        top_k=msg.top_k,
        temperature=msg.temperature if msg.HasField("temperature") else None,
    )


def response_to_proto(resp: schema.ScoreTextResponse) -> pb.ScoreTextResponse:
    out = pb.ScoreTextResponse(model=resp.model, usage=pb.Usage(**resp.usage.model_dump()))
    for s in resp.sequences:
        top_k = len(s.top_tokens[0]) if s.top_tokens else 0
        out.sequences.add(
            token_ids=s.token_ids,
            tokens=s.tokens,
            token_logprobs=s.token_logprobs,
            byte_starts=[a for a, _ in s.byte_spans],
            byte_ends=[b for _, b in s.byte_spans],
            completion_bytes=s.completion_bytes,
            prompt_tokens=s.prompt_tokens,
            top_k=top_k,
            top_tokens=[t for row in s.top_tokens or [] for t in row],
            top_logprobs=[x for row in s.top_logprobs or [] for x in row],
            tail_logprobs=s.tail_logprobs or [],
        )
    return out


def response_from_proto(msg: pb.ScoreTextResponse) -> schema.ScoreTextResponse:
    sequences = []
    for s in msg.sequences:
        k = s.top_k
        rows = range(0, len(s.top_tokens), k) if k else range(0)
        sequences.append(
            schema.TextSequenceScores(
                token_ids=list(s.token_ids),
                tokens=list(s.tokens),
                token_logprobs=list(s.token_logprobs),
                byte_spans=[[a, b] for a, b in zip(s.byte_starts, s.byte_ends, strict=True)],
                completion_bytes=s.completion_bytes,
                prompt_tokens=s.prompt_tokens,
                top_tokens=[list(s.top_tokens[i : i + k]) for i in rows] if k else None,
                top_logprobs=[list(s.top_logprobs[i : i + k]) for i in rows] if k else None,
                tail_logprobs=list(s.tail_logprobs) if k else None,
            )
        )
    usage = schema.Usage(scored_tokens=msg.usage.scored_tokens, forward_tokens=msg.usage.forward_tokens)
    return schema.ScoreTextResponse(model=msg.model, sequences=sequences, usage=usage)
