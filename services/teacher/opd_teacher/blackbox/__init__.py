"""The black-box teacher: a model reachable only through an OpenAI-compatible API.

- api_client.py    the API's client: concurrency limit, timeouts, retries honouring Retry-After
- backend.py       BlackBoxBackend: the teacher as the engine sees it (ModelInfo, continuation calls)
- chat_template.py the teacher's chat template, applied by opd for the raw-text completions endpoint
- chunks.py        choosing chunks of a completion, the smoothed reward, speculative verification
- similarity.py    embedding cosine (all-MiniLM from PyPI) and edit similarity of two texts
- chunk_scorer.py  POST /v1/chunk-score: the teacher's continuations of each chunk's prefix, scored
"""
