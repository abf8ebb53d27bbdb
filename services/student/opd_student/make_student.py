"""`opd make-student`: a student initialised from the teacher by removing whole decoder layers.

Which layers go is measured, not guessed: evenly spaced removal wrecks the model, so we remove, one at a
time, the layer whose removal raises the held-out KL(teacher ‖ student) least (layer_pruning.py). The
held-out text is the teacher's own: a sample of ~48 tokens for each of a few fixed chat prompts, so the
measure asks "how well does the pruned model still predict what the teacher would say".
The output directory holds the weights, the tokenizer and student.json (kept/removed layers, KL).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from opd_client.embedded import DEFAULT_TEACHER, cache_dir, resolve_model
from opd_student.layer_pruning import STRATEGIES, HarmMeter, HeldOut, build_pruned_model, decoder_layers

DEFAULT_LAYERS = 20
DEFAULT_STRATEGY = "greedy"
NEW_TOKENS = 48

# Short and varied (facts, reasoning, code, writing, advice), so no one skill decides which layers stay.
HELD_OUT_PROMPTS = [
    "What causes the seasons on Earth?",
    "Write a haiku about a quiet morning.",
    "Explain what a Python list comprehension is, with an example.",
    "Give me three tips for sleeping better.",
    "If I have 3 apples and buy 5 more, then eat 2, how many are left?",
    "Summarise the story of Little Red Riding Hood in two sentences.",
    "What is the difference between weather and climate?",
    "Write a short, friendly email declining a meeting invitation.",
]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def make_held_out(model, tokenizer, seed: int, new_tokens: int = NEW_TOKENS) -> HeldOut:
    """The teacher's own completions (pure sampling, temperature 1) of HELD_OUT_PROMPTS, one batch."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in HELD_OUT_PROMPTS
    ]
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    torch.manual_seed(seed)
    with torch.no_grad():
        ids_B_L = model.generate(
            **batch,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new_tokens,
            min_new_tokens=1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    prompt_len = batch["input_ids"].shape[1]
    completion_B_C = ids_B_L[:, prompt_len:]
    # Real completion tokens run through the first EOS (which the teacher did predict); after it, padding.
    is_eos_B_C = completion_B_C == tokenizer.eos_token_id
    after_eos_B_C = (is_eos_B_C.long().cumsum(-1) - is_eos_B_C.long()) > 0
    completion_mask_B_C = (~after_eos_B_C).long()
    attention_mask_B_L = torch.cat([batch["attention_mask"], completion_mask_B_C], dim=1)
    return HeldOut(ids_B_L.cpu(), attention_mask_B_L.cpu(), completion_mask_B_C.cpu(), completion_B_C.shape[1])


def make_student(
    teacher: str,
    layers: int,
    out: Path,
    device: str = "cpu",
    seed: int = 0,
    strategy: str = DEFAULT_STRATEGY,
    log=print,
) -> dict:
    """Prune `teacher` to `layers` decoder layers and save it to `out` (must not exist or be empty).

    Returns the record written to out/student.json.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty; choose a new directory or delete it")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
    started = time.perf_counter()
    teacher_dir, teacher_source = resolve_model(teacher)
    torch_device = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).to(torch_device).eval()
    teacher_layers = len(decoder_layers(model))
    if not 1 <= layers <= teacher_layers:
        raise ValueError(f"--layers must be in 1..{teacher_layers} (the teacher's layers), got {layers}")
    log(f"teacher {teacher} ({teacher_layers} layers, {model.num_parameters() / 1e6:.1f}M params) on {torch_device}")

    held_out = make_held_out(model, tokenizer, seed)
    n_tokens = int(held_out.completion_mask_B_C.sum())
    log(f"held-out: {len(HELD_OUT_PROMPTS)} prompts, {n_tokens} teacher-sampled completion tokens (seed {seed})")
    meter = HarmMeter(model, held_out)
    log(
        f"{strategy} search {teacher_layers} → {layers} layers "
        f"(prefix reuse {'on' if meter.reuse_prefix else 'off'}; {time.perf_counter() - started:.1f} s so far)"
    )

    def on_round(n: int, layer: int, kl: float, elapsed: float) -> None:
        log(f"  round {n:2d}: removed layer {layer:2d}  KL {kl:.4f} nats/token  ({elapsed:.1f} s)")

    removal = STRATEGIES[strategy](meter, layers, on_round)
    student = build_pruned_model(model, removal.kept)
    final_kl = removal.kl_after_each_removal[-1] if removal.removed else 0.0
    record = {
        "teacher": teacher,
        "teacher_source": teacher_source,
        "teacher_layers": teacher_layers,
        "kept_layers": removal.kept,
        "removed_layers": removal.removed,
        "kl_after_each_removal": removal.kl_after_each_removal,
        "final_kl": final_kl,
        "params": student.num_parameters(),
        "strategy": strategy,
        "kl_measure": (
            f"mean per-token KL(teacher || student), full vocabulary, on {n_tokens} completion tokens the teacher "
            f"sampled (temperature 1, seed {seed}) for {len(HELD_OUT_PROMPTS)} fixed chat prompts"
        ),
        "evaluations": meter.evaluations,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "student.json").write_text(json.dumps(record, indent=2) + "\n")
    log(
        f"student: {layers} layers, {record['params'] / 1e6:.1f}M params, removed {removal.removed}, "
        f"final KL {final_kl:.4f} nats/token, {meter.evaluations} evaluations in {record['seconds']:.1f} s → {out}"
    )
    return record


def default_student_dir(log=print) -> Path:
    """The default student (the embedded teacher pruned to 20 layers), made on first use; concurrent
    callers wait for one creation, and a half-written directory is never taken for a model."""
    target = cache_dir() / "students" / f"{DEFAULT_TEACHER}-{DEFAULT_LAYERS}L"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            log(f"making the default student (first use; cached in {target})")
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            make_student(DEFAULT_TEACHER, DEFAULT_LAYERS, tmp, device="auto", log=log)
            tmp.rename(target)
    return target


def resolve_student(name_or_path: str) -> Path:
    """"default" → the cached default student (made if missing); otherwise a local HF directory."""
    if name_or_path == "default":
        return default_student_dir()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"student {name_or_path!r} is neither 'default' nor a directory with a config.json "
            "(make one with: opd make-student --out DIR)"
        )
    return path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "make-student",
        help="make a student by removing the teacher's least harmful decoder layers",
        description="Initialise a student from the teacher by removing whole decoder layers, chosen by "
        "measured harm (held-out KL to the teacher on its own text). Writes weights, tokenizer and "
        "student.json (kept/removed layers, KL after each removal).",
    )
    p.add_argument(
        "--teacher", default=DEFAULT_TEACHER, help=f"embedded name or local HF dir (default {DEFAULT_TEACHER})"
    )
    p.add_argument("--layers", type=int, default=DEFAULT_LAYERS, help="decoder layers the student keeps")
    p.add_argument("--out", type=Path, required=True, help="output directory (new or empty)")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling the held-out teacher text")
    p.add_argument(
        "--strategy",
        choices=sorted(STRATEGIES),
        default=DEFAULT_STRATEGY,
        help="greedy: re-rank all remaining layers every round; ranked: rank single removals once",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    try:
        make_student(args.teacher, args.layers, args.out, args.device, args.seed, args.strategy)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        sys.exit(f"opd make-student: {exc}")
