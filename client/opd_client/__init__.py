"""opd_client: talk to an opd teacher service over HTTP or gRPC.

from opd_client import HttpTeacherClient   # or AsyncHttpTeacherClient, GrpcTeacherClient
client = HttpTeacherClient("http://127.0.0.1:8000", api_key="...")
result = client.score([{"token_ids": ids, "prompt_len": 12}], top_k=20)
result.sequences[0].top_logprobs_T_K   # numpy [T, 20]
"""

from opd_client.errors import OpdError
from opd_client.grpc_client import GrpcTeacherClient
from opd_client.http_client import AsyncHttpTeacherClient, HttpTeacherClient
from opd_client.scores import ScoreResult, SequenceScores

__all__ = [
    "AsyncHttpTeacherClient",
    "GrpcTeacherClient",
    "HttpTeacherClient",
    "OpdError",
    "ScoreResult",
    "SequenceScores",
]
