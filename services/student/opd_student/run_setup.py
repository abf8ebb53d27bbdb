"""Everything a training run needs before its first step: run directory, teacher, student, data.

Kept apart from the loop so train.py reads as the loop and nothing else.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opd_client.launch import LocalTeacher, start_teacher
from opd_student.checkpoint import latest_checkpoint
from opd_student.config import TrainConfig
from opd_student.make_student import resolve_student
from opd_student.methods.options import MethodOptions
from opd_student.prompts import parse_prompts, render
from opd_student.rollouts import Rollout
from opd_student.student_model import load_student, pick_device, save_final, use_bf16
from opd_student.teacher_link import TeacherLink


@dataclass
class RunContext:
    cfg: TrainConfig
    run_dir: Path
    model: torch.nn.Module  # what the optimiser updates (a PeftModel with LoRA)
    lm: torch.nn.Module  # the causal LM forwards run on
    tokenizer: object
    link: TeacherLink
    device: torch.device
    bf16: bool
    local_teacher: LocalTeacher | None = None
    methods: MethodOptions | None = None  # the options of docs/methods.md, parsed
    reference: torch.nn.Module | None = None  # loss chunk: the initial student, frozen (KL outside chunks)
    say_hook: object = None
    _dataset: list = field(default_factory=list)
    _dataset_pos: int = 0

    def say(self, message: str) -> None:
        (self.say_hook or print)(message)

    def dataset_rollouts(self, n: int) -> list[Rollout]:
        """The next n fixed sequences (GKD's off-policy share), cycling through the dataset."""
        out = []
        for _ in range(n):
            out.append(self._dataset[self._dataset_pos % len(self._dataset)])
            self._dataset_pos += 1
        return out

    def save_final(self) -> Path:
        out = self.run_dir / "final"
        save_final(self.model, self.tokenizer, out, self.cfg.lora)
        self.say(f"trained student saved to {out}")
        return out

    def close(self) -> None:
        self.link.close()
        if self.local_teacher is not None:
            self.local_teacher.stop()


def setup_run(cfg: TrainConfig, resume: bool) -> RunContext:
    run_dir = Path(cfg.out)
    if latest_checkpoint(run_dir) is not None and not resume:
        raise SystemExit(
            f"error: {run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.to_json() + "\n")

    device = pick_device(cfg.device)
    student_path = resolve_student(cfg.student)
    model, lm, tokenizer = load_student(student_path, cfg, device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id

    local_teacher, url, api_key = None, cfg.teacher_url, os.environ.get(cfg.teacher_api_key_env)
    if url is None and cfg.loss == "chunk":
        raise SystemExit(
            "error: --loss chunk trains against a black-box teacher: start one with `opd serve-teacher "
            "--backend openai --api-base URL --api-model NAME` and pass its --teacher-url"
        )
    if url is None:
        api_key = secrets.token_urlsafe(16)
        models = [m.strip() for m in cfg.local_teacher_models.split(",") if m.strip()] or None
        serving = ", ".join(models) if models else "embedded default teacher"
        print(f"starting a local teacher service (opd serve-teacher, {serving})...", flush=True)
        local_teacher = start_teacher(run_dir, models, api_key=api_key)
        url = local_teacher.http_url
        print(f"teacher ready at {url}; log: {local_teacher.log_path}", flush=True)
    link = TeacherLink(url, api_key, cfg.teacher_timeout_s, cfg.max_inflight_requests, cfg.teacher_wait_s)
    try:
        info = link.check(tokenizer, cfg.teacher_model)
        _check_teacher_kind(cfg, info, url)
    except BaseException:
        link.close()
        if local_teacher is not None:
            local_teacher.stop()
        raise
    ctx = RunContext(cfg, run_dir, model, lm, tokenizer, link, device, use_bf16(cfg, device), local_teacher)
    ctx.link.on_wait = lambda message: ctx.say(message)
    ctx.methods = MethodOptions(cfg)
    if cfg.loss == "chunk" and cfg.chunk_kl_coef > 0:
        # Copied before any checkpoint is loaded: the reference stays the student the run started from.
        ctx.reference = copy.deepcopy(lm).eval().requires_grad_(False)
    if cfg.dataset:
        ctx._dataset = _load_dataset(Path(cfg.dataset), tokenizer)
    print(
        f"student {student_path} ({sum(p.numel() for p in lm.parameters()) / 1e6:.0f}M params, "
        f"bf16 autocast {'on' if ctx.bf16 else 'off'}, {device}); teacher {info.name} at {url}",
        flush=True,
    )
    return ctx


def _check_teacher_kind(cfg: TrainConfig, info, url: str) -> None:
    """A black-box (API) teacher only answers chunk scoring, and chunk scoring needs one."""
    if info.black_box and cfg.loss != "chunk":
        raise SystemExit(
            f"error: teacher {info.name!r} at {url} is black-box ({info.source}): it has no logprobs for "
            f"--loss {cfg.loss}; use --loss chunk"
        )
    if cfg.loss == "chunk" and not info.black_box:
        raise SystemExit(
            f"error: --loss chunk needs a black-box teacher (opd serve-teacher --backend openai); "
            f"teacher {info.name!r} at {url} is white-box: use a logprob loss such as reverse_kl"
        )


def _load_dataset(path: Path, tokenizer) -> list[Rollout]:
    """Fixed sequences for GKD mixing: prompt-file lines with an extra "completion" string."""
    prompt_lines, completions = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            prompt_lines.append(line)
            continue
        try:
            row = json.loads(line)
            completion = row.pop("completion")
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
            raise SystemExit(
                f"error: {path}:{lineno}: a dataset line is a JSON object with a 'completion'"
            ) from None
        if not isinstance(completion, str):
            raise SystemExit(f"error: {path}:{lineno}: completion must be a string")
        prompt_lines.append(json.dumps(row))
        completions.append(completion)
    prompts = parse_prompts("\n".join(prompt_lines), source=str(path))
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append(
            Rollout(render(prompt, tokenizer), ids, None, prompt.teacher, prompt.id, False, prompt.loss_spans)
        )
    if not out:
        raise SystemExit(f"error: dataset {path} is empty")
    return out
