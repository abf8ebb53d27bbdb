"""Random-weight models of real sizes, built from configs alone (no downloads), for `opd bench gpu`.

Speed does not depend on trained weights, so a model built by `from_config` with the shapes of Qwen3-1.7B or
Llama-3-8B runs exactly as fast as the real one (never report quality from them). Each is saved as a
normal HF directory with the embedded teacher's tokenizer beside it: `opd serve-teacher --model DIR` loads
the tokenizer from the model's directory, and the trainer checks that the student's tokenizer is the
teacher's. Token ids stay within that tokenizer's 49,152 ids; the models keep their real vocabulary sizes, so
the head costs what it costs in the real model.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PretrainedConfig, Qwen3Config

from opd_common.embedded import embedded_teacher_dir

# The tokenizer's special ids (SmolLM2's: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2), so generation
# stops where the chat template says and padding uses an id the tokenizer knows.
SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def qwen3(
    hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int = 8, head_dim: int = 128
) -> PretrainedConfig:
    """Qwen3 dense (config.json of Qwen/Qwen3-0.6B, -1.7B): tied head, V 151,936, QK-norm, θ 1e6."""
    return Qwen3Config(
        vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=40960, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, **SPECIAL_IDS,
    )  # fmt: skip


def llama3(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int = 8) -> PretrainedConfig:
    """Llama 3 (config.json of meta-llama/Meta-Llama-3-8B): untied head, V 128,256, θ 5e5."""
    return LlamaConfig(
        vocab_size=128256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
        **SPECIAL_IDS,
    )  # fmt: skip


MODELS: dict[str, Callable[[], PretrainedConfig]] = {
    "qwen3-0.6b": lambda: qwen3(1024, 3072, 28, 16),  # 0.60B parameters
    "qwen3-1.7b": lambda: qwen3(2048, 6144, 28, 16),  # 1.72B
    "llama-3-8b": lambda: llama3(4096, 14336, 32, 32),  # 8.03B
    # The same architectures and vocabularies at 2 layers of 128: every code path, in seconds on a CPU.
    "tiny-qwen3": lambda: qwen3(128, 256, 2, 4, kv_heads=2, head_dim=32),
    "tiny-llama3": lambda: llama3(128, 256, 2, 4, kv_heads=2),
}

# Which teachers each size set serves (the first also serves the trainer step; smallest first, so a tight
# time budget skips the largest), and the trainer step's student.
SIZES: dict[str, dict] = {
    "real": {"teachers": ["qwen3-1.7b", "llama-3-8b"], "student": "qwen3-0.6b"},
    "tiny": {"teachers": ["tiny-qwen3", "tiny-llama3"], "student": "tiny-qwen3"},
}


def build_model_dir(name: str, out_dir: Path, device: torch.device, dtype: torch.dtype) -> dict:
    """Build MODELS[name] with random weights on `device` and save it, with the tokenizer, to out_dir."""
    started = time.perf_counter()
    config = MODELS[name]()
    torch.manual_seed(0)
    with device:  # initialised where it runs: an 8B model's random init on a CPU would take minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    built = time.perf_counter() - started
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(embedded_teacher_dir()).save_pretrained(out_dir)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "model": name,
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "params": params,
        "dtype": str(dtype).removeprefix("torch."),
        "bytes_on_disk": sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file()),
        "build_s": built,
        "save_s": time.perf_counter() - started - built,
    }
