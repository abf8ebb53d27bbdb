"""Everything a training run needs before its first step, built once and typed: the run directory and
its console, the student, the teacher service, the teacher signal, the batch source and the held-out
prompts. Kept apart from the loop so train.py reads as the loop and nothing else.
"""

from __future__ import annotations

import os
import secrets
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from opd_client.schema import ModelInfo
from opd_common.launch import LocalTeacher, start_teacher
from opd_student import signals
from opd_student.batches import BatchSource, load_dataset
from opd_student.checkpoint import latest_checkpoint
from opd_student.config import TrainConfig
from opd_student.distributed import (
    World,
    close_process_group,
    init_process_group,
    rank_device,
    world_from_env,
)
from opd_student.methods.options import MethodOptions
from opd_student.methods.prompt_selection import select_prompts
from opd_student.methods.routing import Rule, teachers_used
from opd_student.methods.sampling import make_sampler
from opd_student.methods.step_extras import StepExtras
from opd_student.prompts import Prompt, load_prompts
from opd_student.rollout_factory import RolloutFactory
from opd_student.signals.base import TeacherSignal
from opd_student.student_model import Student, pick_device
from opd_student.teacher_follow import NoFollowing, TeacherFollower, make_follower
from opd_student.teacher_link import TeacherLink
from opd_student.tools.make_student import resolve_student


@dataclass
class Console:
    """What the run tells its user: rank 0 alone prints, through the progress bar while one is shown."""

    world: World
    hook: Callable[[str], None] | None = None

    def say(self, message: str) -> None:
        if not self.world.is_main:
            return
        if self.hook is not None:
            self.hook(message)
        else:
            print(message, flush=True)


@dataclass
class TeacherService:
    """The teacher service this run trains against, and the local one it started (if any)."""

    link: TeacherLink
    info: ModelInfo
    url: str
    local: LocalTeacher | None = None

    def close(self, world: World) -> None:
        self.link.close()
        world.barrier()  # the local teacher (rank 0's) serves until every rank is done with it
        if self.local is not None:
            self.local.stop()

    def abort(self) -> None:
        """On a failed start: no barrier (other ranks may not get here)."""
        self.link.close()
        if self.local is not None:
            self.local.stop()


@dataclass
class Run:
    cfg: TrainConfig
    dir: Path
    world: World
    console: Console
    student: Student
    teacher: TeacherService
    signal: TeacherSignal
    methods: MethodOptions
    batches: BatchSource
    eval_prompts: list[Prompt] = field(default_factory=list)
    # after each optimizer step: the student's weights to the teacher (teacher_follows_student)
    follower: TeacherFollower | NoFollowing = field(default_factory=NoFollowing)
    # gradient and parameter options around the optimizer step (lm_coef, update_mask, effopd)
    extras: StepExtras = field(default_factory=StepExtras)

    def close(self) -> None:
        self.follower.close()
        self.teacher.close(self.world)
        close_process_group()


def setup_run(cfg: TrainConfig, resume: bool) -> Run:
    world = world_from_env()
    device = rank_device(pick_device(cfg.device), world)
    _check_world(cfg, world)
    init_process_group(world, device)
    try:
        return _setup(cfg, resume, world, device)
    except BaseException:
        close_process_group()
        raise


def _setup(cfg: TrainConfig, resume: bool, world: World, device) -> Run:
    run_dir = Path(cfg.out)
    if latest_checkpoint(run_dir) is not None and not resume:
        raise SystemExit(
            f"error: {run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.to_json() + "\n")
    console = Console(world)
    student_path = resolve_student(cfg.student)  # builds the default student once, under a file lock
    student = Student.load(student_path, cfg, device, world, keep_initial=signals.keeps_initial(cfg))
    teacher = _connect_teacher(cfg, run_dir, world, student)
    teacher.link.on_wait = console.say
    try:
        methods = MethodOptions(cfg)
        factory = RolloutFactory(student.tokenizer, cfg.teacher_model, methods.rules, cfg.privileged_context)
        signal = signals.make_signal(cfg, student, teacher.link, factory, methods)
        signal.check_teacher(teacher.info, teacher.url)
        prompts = select_prompts(cfg, load_prompts(cfg.prompts), student, teacher.link, factory, console.say)
        methods.several_teachers = check_routed_teachers(
            teacher.link,
            student.tokenizer,
            prompts,
            methods.rules,
            cfg.teacher_model,
            signal.check_teacher,
            # the cross-tokenizer signal scores every teacher by text, whatever its tokenizer
            allow_other_tokenizer=isinstance(signal, signals.CrossTokenizer),
        )
        dataset = load_dataset(Path(cfg.dataset), factory) if cfg.dataset else None
        batches = BatchSource(cfg, student, factory, methods, prompts, dataset)
        batches.sampler = make_sampler(cfg, student, factory, teacher.link)  # None unless a method needs it
        eval_prompts = load_prompts(cfg.eval_prompts)[: cfg.eval_num_prompts]
        follower = make_follower(cfg, student, teacher.link, teacher.info)
        extras = StepExtras.build(cfg, student, run_dir)
    except BaseException:
        teacher.abort()
        raise
    ranks = f"; {world.size} ranks, {cfg.parallel}" if world.distributed else ""
    console.say(
        f"student {student_path} ({student.num_params / 1e6:.0f}M params, bf16 autocast "
        f"{'on' if student.bf16 else 'off'}, {device}{ranks}); teacher {teacher.info.name} at {teacher.url}"
    )
    return Run(
        cfg,
        run_dir,
        world,
        console,
        student,
        teacher,
        signal,
        methods,
        batches,
        eval_prompts,
        follower,
        extras,
    )


def _connect_teacher(cfg: TrainConfig, run_dir: Path, world: World, student: Student) -> TeacherService:
    """The service at teacher_url, or (none given) a local `opd serve-teacher` that rank 0 starts."""
    local, url, api_key = None, cfg.teacher_url, os.environ.get(cfg.teacher_api_key_env)
    if url is None and cfg.loss == "chunk":
        raise SystemExit(
            "error: --loss chunk trains against a black-box teacher: start one with `opd serve-teacher "
            "--backend openai --api-base URL --api-model NAME` and pass its --teacher-url"
        )
    if url is None:
        api_key = secrets.token_urlsafe(16)
        if world.is_main:  # one local teacher for all ranks of this machine
            models = [m.strip() for m in cfg.local_teacher_models.split(",") if m.strip()] or None
            if cfg.self_distillation:  # the teacher is the student as it starts
                models = [f"student={student.path}"]
            serving = ", ".join(models) if models else "embedded default teacher"
            print(f"starting a local teacher service (opd serve-teacher, {serving})...", flush=True)
            # a teacher that follows the student takes its weights (docs/api.md, live weight updates)
            extra = ["--weight-updates"] if cfg.teacher_follows_student else []
            extra += shlex.split(cfg.local_teacher_args)  # e.g. a steering vector (SafeSteer)
            local = start_teacher(run_dir, models, api_key=api_key, extra_args=extra)
            url = local.http_url
            print(f"teacher ready at {url}; log: {local.log_path}", flush=True)
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
        info = link.check(student.tokenizer, cfg.teacher_model, allow_other_tokenizer=cfg.cross_tokenizer)
    except BaseException:
        link.close()
        if local is not None:
            local.stop()
        raise
    return TeacherService(link, info, url, local)


def check_routed_teachers(
    link: TeacherLink,
    tokenizer,
    prompts: list[Prompt],
    rules: list[Rule],
    default: str | None,
    check_teacher: Callable[[ModelInfo, str], None],
    allow_other_tokenizer: bool = False,
) -> bool:
    """Every teacher the prompts route to exists on the service, shares the student's tokenizer and passes
    the signal's check (a clear error at start instead of a failed request at the first step). True when
    there are several (the per-teacher metrics are then logged)."""
    names = teachers_used(prompts, rules, default)
    for name in names:
        if name != default:  # the default teacher is checked already
            check_teacher(link.check(tokenizer, name, allow_other_tokenizer), link.url)
    return len(names) > 1


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
