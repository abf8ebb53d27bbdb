"""How far bf16 teacher scoring lands from fp32 on the demo's own sequences (docs/benchmarks.md, "Scoring in
bf16 on this CPU"): the 32 held-out prompts with the default student's sampled answers, scored by the
default teacher in fp32 and in two bf16 ways — bf16 weights, and fp32 weights with the decoder body under
bf16 autocast and the output head in fp32 — as the full-vocabulary KL(p_fp32 ‖ p_mode) per position; and
each way's raw scoring speed on 32 random 256-token sequences (192 scored positions each, top-20), best of 3.

    .venv/bin/python -m opd_bench.bf16_accuracy [--prompts 32] [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_common.embedded import DEFAULT_TEACHER, resolve_model
from opd_student.prompts import load_prompts, render
from opd_student.tools.make_student import default_student_dir


def student_sequences(tokenizer, num_prompts: int, new_tokens: int) -> list[tuple[torch.Tensor, int]]:
    """(token ids, prompt length) per held-out prompt: the default student's answer, sampled with seed i."""
    student = AutoModelForCausalLM.from_pretrained(default_student_dir(), dtype=torch.float32).eval()
    sequences = []
    with torch.no_grad():
        for i, prompt in enumerate(load_prompts("default-heldout")[:num_prompts]):
            ids_1_P = torch.tensor([render(prompt, tokenizer)])
            torch.manual_seed(i)
            out_1_T = student.generate(
                ids_1_P, max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0
            )
            sequences.append((out_1_T[0], ids_1_P.shape[1]))
    return sequences


@torch.no_grad()
def completion_logprobs(model, sequences, mode: str) -> list[torch.Tensor]:
    """log p over the vocabulary at each completion position, [T, V] float32 per sequence."""
    out = []
    for ids_T, prompt_len in sequences:
        if mode == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hidden_1_T_D = model.model(input_ids=ids_T[None]).last_hidden_state
            logits_T_V = model.lm_head(hidden_1_T_D[0, prompt_len - 1 : -1].float())
        else:
            logits_T_V = model(input_ids=ids_T[None]).logits[0, prompt_len - 1 : -1].float()
        out.append(torch.log_softmax(logits_T_V, dim=-1))
    return out


def raw_tokens_per_s(model, mode: str, batch: int = 32, length: int = 256, prompt: int = 64) -> float:
    """Scored positions per second of one batched forward, log-softmax and top-20 (best of 3, after a warm-up)."""
    ids_B_T = torch.randint(
        0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0)
    )
    sequences = [(ids_T, prompt) for ids_T in ids_B_T]

    @torch.no_grad()
    def once() -> None:
        if mode == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hidden_B_T_D = model.model(input_ids=ids_B_T).last_hidden_state
            logits = model.lm_head(hidden_B_T_D[:, prompt - 1 : -1].float())
        else:
            logits = model(input_ids=ids_B_T).logits[:, prompt - 1 : -1].float()
        torch.log_softmax(logits, dim=-1).topk(20, dim=-1)

    once()
    best = min(_timed(once) for _ in range(3))
    return sum(len(ids_T) - p for ids_T, p in sequences) / best


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def compare(reference: list[torch.Tensor], other: list[torch.Tensor], sequences) -> dict[str, float]:
    kl_N = torch.cat([(ref.exp() * (ref - oth)).sum(-1) for ref, oth in zip(reference, other, strict=True)])
    top1_N = torch.cat(
        [(ref.argmax(-1) == oth.argmax(-1)).float() for ref, oth in zip(reference, other, strict=True)]
    )
    token_diff_N = torch.cat(
        [
            (ref - oth).gather(1, ids_T[prompt_len:, None])[:, 0].abs()
            for (ids_T, prompt_len), ref, oth in zip(sequences, reference, other, strict=True)
        ]
    )
    kl64 = kl_N.double()
    return {
        "positions": int(kl_N.numel()),
        "kl_mean": float(kl64.mean()),
        "kl_p50": float(torch.quantile(kl64, 0.5)),
        "kl_p99": float(torch.quantile(kl64, 0.99)),
        "kl_max": float(kl64.max()),
        "token_logprob_absdiff_mean": float(token_diff_N.mean()),
        "top1_agreement": float(top1_N.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    path = resolve_model(DEFAULT_TEACHER)[0]
    tokenizer = AutoTokenizer.from_pretrained(path)
    sequences = student_sequences(tokenizer, args.prompts, args.new_tokens)
    fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    reference = completion_logprobs(fp32, sequences, "fp32")
    result = {
        "bf16_weights": compare(reference, completion_logprobs(bf16, sequences, "bf16"), sequences),
        "bf16_autocast_fp32_head": compare(
            reference, completion_logprobs(fp32, sequences, "autocast"), sequences
        ),
    }
    result["raw_tokens_per_s"] = {
        "fp32": raw_tokens_per_s(fp32, "fp32"),
        "bf16_weights": raw_tokens_per_s(bf16, "bf16"),
        "bf16_autocast_fp32_head": raw_tokens_per_s(fp32, "autocast"),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
