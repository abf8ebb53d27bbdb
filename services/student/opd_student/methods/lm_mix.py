"""`lm_coef = α`: every step mixes a next-token (language-modelling) loss on a text set into the OPD loss,

    L = (1 − α) · L_OPD + α · L_LM,      L_LM = − (1/N) Σ_t log q(x_t | x_<t)  over the step's text tokens,

as pre-training distillation mixes the LM loss on the corpus with the KD loss (Peng et al. 2024, *Pre-training
Distillation for Large Language Models: A Design Space Exploration*, arXiv 2410.16215; their coefficient
weighs the KD term, ours the LM term, α = 1 − theirs). Each step takes `lm_batch_size` texts of `lm_data`
in a seeded order that depends only on the step index (a resumed run takes the same ones); the OPD
gradient, once complete, is scaled by 1 − α and α·L_LM's is accumulated on top, micro-batch by micro-batch.

`lm_data`: a JSONL file of {"text": ...} lines (the loss on every token after the first), or of prompt-file
lines with a "completion" (the GKD dataset format: the loss on the completion and EOS), or the shipped
"default-reference": the reference answers of default-privileged as completions of their prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from opd_student.microbatch import MicroBatch, accumulate_gradients
from opd_student.prompts import load_prompts, parse_prompts, render
from opd_student.rollouts import Rollout

REFERENCE_SET = "default-reference"
REFERENCE_MARK = "A correct reference answer: "


def load_lm_texts(spec: str, tokenizer, max_tokens: int) -> list[Rollout]:
    """The text set as Rollouts: prompt_ids the context, completion_ids the tokens the loss applies to
    (at most max_tokens of them)."""
    eos = tokenizer.eos_token_id
    out = []
    for context, target in _pairs(spec, tokenizer, eos):
        target = target[:max_tokens]
        if context and target:
            out.append(Rollout(context, target, on_policy=False))
    if not out:
        raise SystemExit(f"error: lm_data {spec}: no text with at least two tokens")
    return out


def _pairs(spec: str, tokenizer, eos: int) -> list[tuple[list[int], list[int]]]:
    if spec == REFERENCE_SET:
        pairs = []
        for prompt in load_prompts("default-privileged"):
            assert prompt.teacher_messages is not None, "every default-privileged prompt has a reference"
            answer = prompt.teacher_messages[-1]["content"].split(REFERENCE_MARK, 1)[-1]
            pairs.append((render(prompt, tokenizer), _ids(tokenizer, answer) + [eos]))
        return pairs
    path = Path(spec)
    if not path.is_file():
        raise SystemExit(f"error: lm_data {spec}: no such file (or the shipped set {REFERENCE_SET!r})")
    pairs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise SystemExit(f"error: {path}:{lineno}: not JSON") from None
        if isinstance(row, dict) and isinstance(row.get("text"), str) and len(row) == 1:
            ids = list(tokenizer(row["text"], add_special_tokens=True)["input_ids"])
            pairs.append((ids[:1], ids[1:]))
        elif isinstance(row, dict) and isinstance(row.get("completion"), str):
            completion = row.pop("completion")
            prompt = parse_prompts(json.dumps(row), source=f"{path}:{lineno}")[0]
            pairs.append((render(prompt, tokenizer), _ids(tokenizer, completion) + [eos]))
        else:
            raise SystemExit(
                f'error: {path}:{lineno}: an lm_data line is {{"text": ...}} or a prompt line with a "completion"'
            )
    return pairs


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class LMLossMix:
    def __init__(self, coef: float, texts: list[Rollout], batch_size: int, seed: int) -> None:
        self.coef, self.texts, self.batch_size, self.seed = coef, texts, batch_size, seed

    def texts_for(self, step_index: int) -> list[Rollout]:
        """The step's texts: positions k·B … k·B + B − 1 of an endless stream of seeded permutations."""
        n, out = len(self.texts), []
        for j in range(step_index * self.batch_size, (step_index + 1) * self.batch_size):
            epoch, pos = divmod(j, n)
            order = np.random.default_rng([self.seed, 21, epoch]).permutation(n)
            out.append(self.texts[int(order[pos])])
        return out

    def add_gradients(
        self, student, params: list[torch.nn.Parameter], step_index: int, micro_batch_size: int
    ) -> dict[str, float]:
        """Turn the complete OPD gradient g into (1 − α)·g + α·∇L_LM (every rank its share of the texts)."""
        world = student.world
        for p in params:
            if p.grad is not None:
                p.grad.mul_(1.0 - self.coef)
        rows = self.texts_for(step_index)
        mine = [rows[i] for i in world.share(len(rows))]
        tokens = world.sum([float(sum(len(r.completion_ids) for r in mine))])[0]
        nll_sum = [0.0]

        def per_token_loss(mb: MicroBatch) -> torch.Tensor:
            nll_B_T = -mb.token_logprobs_B_T * mb.mask_B_T
            nll_sum[0] += float(nll_B_T.detach().sum())
            return self.coef * nll_B_T

        accumulate_gradients(student, mine, micro_batch_size, tokens, per_token_loss)
        return {"lm/nll": world.sum([nll_sum[0]])[0] / max(tokens, 1.0), "lm/tokens": int(tokens)}
