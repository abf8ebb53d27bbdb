"""Cross-tokenizer test helpers: a tiny random model with Gemma 3's tokenizer (another tokenizer than the
default teacher's), and its service fixture's model specs."""

from __future__ import annotations

from pathlib import Path


def make_tiny_gemma_tokenizer_model(out_dir: Path, layers: int = 2, seed: int = 0) -> Path:
    """A random small Llama with the embedded Gemma 3 270M's tokenizer (262,144 tokens, SentencePiece
    style): fast to run, and its tokens cut text differently from SmolLM2's."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from opd_common.embedded import gemma_teacher_dir

    if (out_dir / "config.json").exists():
        return out_dir
    tokenizer = AutoTokenizer.from_pretrained(gemma_teacher_dir())
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a sharper-than-init distribution, so top-k is not nearly uniform
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
