"""The black-box teacher: a model reachable only through an OpenAI-compatible chat API.

- api_client.py    the API's client: concurrency limit, timeouts, retries honouring Retry-After
- backend.py       BlackBoxBackend: the teacher as the engine sees it (ModelInfo, continuation calls)
- chunks.py        choosing chunks of a completion, the smoothed reward, speculative verification
- similarity.py    embedding cosine (all-MiniLM from PyPI) and edit similarity of two texts
- chunk_scorer.py  POST /v1/chunk-score: the teacher's continuations of each chunk's prefix, scored
"""
