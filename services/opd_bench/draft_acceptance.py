"""`opd bench draft`: how long the runs are that a draft model gets accepted when it drafts for the teacher in
transformers' assisted generation (speculative decoding), one or several drafts side by side in one run.

Greedy assisted generation (do_sample=False) with a constant block of `draft_tokens` drafted tokens and no
confidence cut-off, one held-out prompt at a time (assisted generation takes batch size 1). Each verification
cycle is one forward of the teacher and yields the accepted drafted tokens plus the teacher's own next token,
so the acceptance length — the tokens a cycle yields, EAGLE's τ — is generated tokens / teacher forwards,
counted with a forward hook. 1 means no drafted token was ever accepted; draft_tokens + 1 is the most.
`reference_cycles` is the same greedy draft-and-verify loop written directly (no KV cache), for the tests.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from opd_common.dataclass_flags import add_dataclass_flags, dataclass_from_args
from opd_common.embedded import DEFAULT_TEACHER, resolve_model


@dataclass(frozen=True)
class DraftBenchConfig:
    teacher: str = DEFAULT_TEACHER  # embedded teacher name or HF directory (the target that verifies)
    drafts: str = "default"  # comma-separated drafts: HF directories (a run's final/), or "default"
    prompts: str = "default-heldout"  # prompt set or JSONL (rendered with the teacher's chat template)
    num_prompts: int = 32  # held-out prompts, the first of the set
    max_new_tokens: int = 64  # tokens generated per prompt
    draft_tokens: int = 4  # tokens drafted per cycle (constant schedule)
    out: str = ""  # write the JSON here too


@dataclass
class Acceptance:
    draft: str
    prompts: int
    generated_tokens: int
    teacher_forwards: int
    acceptance_length: float  # generated tokens per teacher forward (τ)
    accepted_fraction: float  # accepted drafted tokens / drafted tokens
    seconds: float


class Verified(NamedTuple):
    generated: list[int]  # the ids speculative decoding produced (the teacher's greedy answer)
    cycles: int  # verification cycles: teacher forwards
    errors: list[int]  # indices of generated ids where the teacher replaced a drafted token
    drafted: list[int]  # indices of generated ids the draft proposed (accepted or not)


@torch.inference_mode()
def reference_cycles(
    teacher, draft, prompt_ids: list[int], max_new_tokens: int, draft_tokens: int, eos: int
) -> Verified:
    """Greedy draft-and-verify written out: the draft proposes up to `draft_tokens` argmax tokens, the
    teacher keeps the longest prefix that equals its own argmax and adds its argmax at the first mismatch
    (an error position), or after the block when all match (a bonus token, at a position the draft did not
    propose). Block sizes near the end follow transformers (at most max_new_tokens − generated − 1)."""
    ids = list(prompt_ids)
    generated: list[int] = []
    errors: list[int] = []
    drafted: list[int] = []
    cycles = 0
    while len(generated) < max_new_tokens:
        k = min(draft_tokens, max_new_tokens - len(generated) - 1)
        block: list[int] = []
        for _ in range(k):
            logits = draft(torch.tensor([ids + block])).logits[0, -1]
            block.append(int(logits.argmax()))
        teacher_next = teacher(torch.tensor([ids + block])).logits[0, len(ids) - 1 :].argmax(-1).tolist()
        cycles += 1
        drafted += range(len(generated), len(generated) + len(block))
        accepted = 0
        while accepted < len(block) and block[accepted] == teacher_next[accepted]:
            accepted += 1
        if accepted < len(block):
            errors.append(len(generated) + accepted)
        new = block[:accepted] + [teacher_next[accepted]]
        for token in new:
            generated.append(token)
            if token == eos or len(generated) == max_new_tokens:
                return Verified(generated, cycles, errors, [t for t in drafted if t < len(generated)])
        ids += new
    return Verified(generated, cycles, errors, [t for t in drafted if t < len(generated)])


def assisted_counts(
    teacher, draft, prompt_ids: list[int], max_new_tokens: int, draft_tokens: int, eos: int
) -> tuple[list[int], int]:
    """(generated ids, teacher forwards) of one transformers assisted generation."""
    draft.generation_config.num_assistant_tokens = draft_tokens
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0
    calls = [0]
    hook = teacher.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        input_ids = torch.tensor([prompt_ids], device=teacher.device)
        out = teacher.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            assistant_model=draft,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    finally:
        hook.remove()
    return out[0, len(prompt_ids) :].tolist(), calls[0]


def measure(teacher, draft, prompts_ids: list[list[int]], cfg: DraftBenchConfig, eos: int, name: str):
    started = time.perf_counter()
    generated = forwards = 0
    for ids in prompts_ids:
        out, calls = assisted_counts(teacher, draft, ids, cfg.max_new_tokens, cfg.draft_tokens, eos)
        generated += len(out)
        forwards += calls
    # each forward drafted up to draft_tokens and kept all but the teacher's own token
    drafted = forwards * cfg.draft_tokens
    return Acceptance(
        draft=name,
        prompts=len(prompts_ids),
        generated_tokens=generated,
        teacher_forwards=forwards,
        acceptance_length=generated / max(1, forwards),
        accepted_fraction=(generated - forwards) / max(1, drafted),
        seconds=time.perf_counter() - started,
    )


def run(cfg: DraftBenchConfig) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_student.prompts import load_prompts, render
    from opd_student.tools.make_student import resolve_student

    if cfg.draft_tokens < 1 or cfg.max_new_tokens < 1 or cfg.num_prompts < 1:
        raise SystemExit("error: draft_tokens, max_new_tokens and num_prompts must be >= 1")
    teacher_dir, _ = resolve_model(cfg.teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    prompts = load_prompts(cfg.prompts)[: cfg.num_prompts]
    prompts_ids = [render(p, tokenizer) for p in prompts]
    results = []
    for name in [d.strip() for d in cfg.drafts.split(",") if d.strip()]:
        draft = AutoModelForCausalLM.from_pretrained(resolve_student(name), dtype=torch.float32).eval()
        if draft.config.vocab_size != teacher.config.vocab_size:
            raise SystemExit(
                f"error: draft {name!r} has vocab_size {draft.config.vocab_size}, the teacher "
                f"{teacher.config.vocab_size}: assisted generation needs the teacher's tokenizer"
            )
        result = measure(teacher, draft, prompts_ids, cfg, tokenizer.eos_token_id, name)
        print(
            f"{name}: acceptance length {result.acceptance_length:.3f} tokens per teacher forward "
            f"({result.accepted_fraction:.1%} of drafted tokens accepted; {result.generated_tokens} tokens, "
            f"{result.teacher_forwards} forwards, {result.seconds:.0f} s)",
            flush=True,
        )
        results.append(asdict(result))
    record = {"config": asdict(cfg), "results": results}
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(record, indent=2) + "\n")
    return record


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "draft",
        help="acceptance length of draft models drafting for the teacher (assisted generation)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_flags(p, DraftBenchConfig, defaults_from_cls=True)
    p.set_defaults(func=lambda args: run(dataclass_from_args(DraftBenchConfig, args)))
