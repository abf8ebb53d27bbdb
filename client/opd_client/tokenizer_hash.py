"""A tokenizer fingerprint both sides compute the same way, to catch a student/teacher mismatch."""

from __future__ import annotations

import hashlib
import json


def tokenizer_sha256(tokenizer) -> str:
    """sha256 over the vocabulary (token → id) and the special tokens.

    Hashing the serialized tokenizer.json would also hash padding/truncation settings, which differ
    between two loads of the same tokenizer; the vocabulary is what must match for ids to mean the same.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted(str(t) for t in tokenizer.all_special_tokens)
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
