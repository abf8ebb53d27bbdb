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
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from opd_common.launch import LocalTeacher, start_teacher
from opd_student.checkpoint import latest_checkpoint
from opd_student.config import TrainConfig
from opd_student.distributed import (
    World,
    close_process_group,
    init_process_group,
    is_sharded,
    rank_device,
    world_from_env,
    wrap_student,
)
from opd_student.methods.options import MethodOptions
from opd_student.prompts import parse_prompts, render
from opd_student.rollouts import Rollout
from opd_student.student_model import load_student, pick_device, save_final, use_bf16
from opd_student.teacher_link import TeacherLink
from opd_student.tools.make_student import resolve_student


@dataclass
class RunContext:
    cfg: TrainConfig
    run_dir: Path
    model: torch.nn.Module  # what the optimiser updates (a PeftModel with LoRA)
    lm: torch.nn.Module  # the causal LM (unwrapped)
    student: torch.nn.Module  # what forwards and sampling run on: CompletionLogprobs, wrapped under torchrun
    tokenizer: object
    link: TeacherLink
    device: torch.device
    bf16: bool
    local_teacher: LocalTeacher | None = None
    methods: MethodOptions | None = None  # the options of docs/methods.md, parsed
    world: World = field(default_factory=World)
    student_path: Path | None = None
    reference: torch.nn.Module | None = None  # loss chunk: the initial student, frozen (KL outside chunks)
    say_hook: object = None
    _dataset: list = field(default_factory=list)
    _dataset_pos: int = 0

    def say(self, message: str) -> None:
        if not self.world.is_main:
            return
        if self.say_hook is not None:
            self.say_hook(message)
        else:
            print(message, flush=True)

    def dataset_rollouts(self, n: int) -> list[Rollout]:
        """The next n fixed sequences (GKD's off-policy share), cycling through the dataset."""
        out = []
        for _ in range(n):
            out.append(self._dataset[self._dataset_pos % len(self._dataset)])
            self._dataset_pos += 1
        return out

    def save_final(self) -> Path:
        """run_dir/final: a plain HF directory (rank 0 writes it; FSDP shards are gathered first)."""
        out = self.run_dir / "final"
        model = self.model
        if is_sharded(model):
            full = get_model_state_dict(
                model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            if self.world.is_main:
                model = load_student(self.student_path, self.cfg, torch.device("cpu"))[0]
                model.load_state_dict(full)
        if self.world.is_main:
            save_final(model, self.tokenizer, out, self.cfg.lora)
        self.say(f"trained student saved to {out}")
        return out

    def close(self) -> None:
        self.link.close()
        self.world.barrier()  # the local teacher (rank 0's) serves until every rank is done with it
        if self.local_teacher is not None:
            self.local_teacher.stop()
        close_process_group()


def setup_run(cfg: TrainConfig, resume: bool) -> RunContext:
    world = world_from_env()
    device = rank_device(pick_device(cfg.device), world)
    _check_world(cfg, world)
    init_process_group(world, device)
    try:
        return _setup(cfg, resume, world, device)
    except BaseException:
        close_process_group()
        raise


def _setup(cfg: TrainConfig, resume: bool, world: World, device: torch.device) -> RunContext:
    run_dir = Path(cfg.out)
    if latest_checkpoint(run_dir) is not None and not resume:
        raise SystemExit(
            f"error: {run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.to_json() + "\n")

    student_path = resolve_student(cfg.student)  # builds the default student once, under a file lock
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
        if world.is_main:  # one local teacher for all ranks of this machine
            models = [m.strip() for m in cfg.local_teacher_models.split(",") if m.strip()] or None
            serving = ", ".join(models) if models else "embedded default teacher"
            print(f"starting a local teacher service (opd serve-teacher, {serving})...", flush=True)
            local_teacher = start_teacher(run_dir, models, api_key=api_key)
            url = local_teacher.http_url
            print(f"teacher ready at {url}; log: {local_teacher.log_path}", flush=True)
        url, api_key = world.broadcast((url, api_key))
    link = TeacherLink(
        url,
        api_key,
        cfg.teacher_timeout_s,
        cfg.max_inflight_requests,
        cfg.teacher_wait_s,
        first_replica=world.rank,
    )
    try:
        info = link.check(tokenizer, cfg.teacher_model)
        _check_teacher_kind(cfg, info, url)
    except BaseException:
        link.close()
        if local_teacher is not None:
            local_teacher.stop()
        raise
    reference = None
    if cfg.loss == "chunk" and cfg.chunk_kl_coef > 0:
        # Copied before any checkpoint is loaded: the reference stays the student the run started from.
        reference = copy.deepcopy(lm).eval().requires_grad_(False)
    student = wrap_student(lm, cfg.parallel, world)
    ctx = RunContext(
        cfg, run_dir, model, lm, student, tokenizer, link, device, use_bf16(cfg, device), local_teacher
    )
    ctx.world = world
    ctx.student_path = student_path
    ctx.reference = reference
    ctx.link.on_wait = lambda message: ctx.say(message)
    ctx.methods = MethodOptions(cfg)
    if cfg.dataset:
        ctx._dataset = _load_dataset(Path(cfg.dataset), tokenizer)
    ranks = f"; {world.size} ranks, {cfg.parallel}" if world.distributed else ""
    ctx.say(
        f"student {student_path} ({sum(p.numel() for p in lm.parameters()) / 1e6:.0f}M params, "
        f"bf16 autocast {'on' if ctx.bf16 else 'off'}, {device}{ranks}); teacher {info.name} at {url}"
    )
    return ctx


def _check_world(cfg: TrainConfig, world: World) -> None:
    """What torchrun runs need before any process group exists (every rank reaches the same verdict)."""
    if not world.distributed:
        return
    if cfg.prompts_per_step % world.size:
        raise SystemExit(
            f"error: prompts_per_step ({cfg.prompts_per_step}) must be a multiple of the number of trainer "
            f"processes ({world.size}): each rank samples an equal share of the step's prompts"
        )
    if cfg.teacher_url is None and not world.single_node:
        raise SystemExit(
            "error: a run on several machines needs --teacher-url (the teacher `opd train` would start "
            "listens on rank 0's loopback only)"
        )


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
