"""`opd codistill`: on-policy co-distillation (OPCoD) as one command — two students, each the other's teacher.

    service A  serves student A (opd serve-teacher --weight-updates)     service B  serves student B
    trainer A  trains A against service B, pushes A to service A         trainer B  the mirror image

Both trainers are ordinary `opd train` processes running at once with `--teacher-follows-student N
--student-push-url <its own service>`: after every N steps each pushes its weights to the service its peer
trains against, so each student's teacher is the other's current weights (at most N steps old). Everything
else is a TrainConfig setting shared by both sides (`--config FILE` and the `opd train` flags after `--`);
`--a-prompts` / `--b-prompts` give each side its own prompts. Each run directory (OUT/a, OUT/b) is a normal
run (metrics.jsonl, checkpoints, final/); the services' logs are in OUT.

OPCoD's two devices (Byeon et al. 2026, arXiv 2606.14368) map to: cognizance gating → `cognizance_gate`
(methods/cognizance.py, the peer's feedback only where it is confident); feedback anchoring → the peer
teacher scores each completion after the problem itself (the student's prompt, or its teacher_messages),
which every opd teacher request does.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from opd_common.launch import LocalTeacher, start_teacher
from opd_student.tools.make_student import resolve_student


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "codistill",
        help="co-distillation: two students, two teacher services, each student the other's teacher",
        description="Start a teacher service for each of two students and two `opd train` processes, each "
        "training one student against the other's service and pushing its weights to its own (OPCoD). "
        "Flags after `--` go to both trainers.",
    )
    p.add_argument("--a", required=True, metavar="STUDENT", help="student A: HF directory or 'default'")
    p.add_argument("--b", required=True, metavar="STUDENT", help="student B: HF directory or 'default'")
    p.add_argument("--out", type=Path, required=True, help="OUT/a and OUT/b are the two run directories")
    p.add_argument(
        "--config", type=Path, help="TrainConfig TOML/YAML for both sides (e.g. recipes/opcod.toml)"
    )
    p.add_argument("--follow", type=int, default=1, metavar="N", help="push each student every N steps")
    p.add_argument("--a-prompts", help="student A's training prompts (default: the config's)")
    p.add_argument("--b-prompts", help="student B's training prompts (default: the config's)")
    p.add_argument("--dtype", default="float32", help="the services' --dtype (the students' pushes are cast)")
    p.add_argument("--device", default="auto", help="the services' --device")
    p.add_argument("train_flags", nargs=argparse.REMAINDER, help="-- then opd train flags for both sides")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    if args.follow < 1:
        raise SystemExit(f"error: --follow must be >= 1; got {args.follow}")
    flags = [f for f in args.train_flags if f != "--"]
    for reserved in (
        "--student",
        "--teacher-url",
        "--out",
        "--student-push-url",
        "--teacher-follows-student",
    ):
        if reserved in flags:
            raise SystemExit(f"error: opd codistill sets {reserved} for each side; leave it out")
    students = {"a": resolve_student(args.a), "b": resolve_student(args.b)}
    args.out.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(16)
    services: dict[str, LocalTeacher] = {}
    try:
        for side, path in students.items():
            extra = ["--weight-updates", "--dtype", args.dtype, "--device", args.device]
            services[side] = start_teacher(args.out / f"service-{side}", [f"{side}={path}"], key, extra)
            print(f"service {side}: {path} at {services[side].http_url}", flush=True)
        codes = run_both(args, students, services, flags, key)
    finally:
        for service in services.values():
            service.stop()
    for side, code in codes.items():
        print(f"trainer {side}: exit {code}; run in {args.out / side}", flush=True)
    if any(codes.values()):
        raise SystemExit(1)


def run_both(
    args: argparse.Namespace,
    students: dict[str, Path],
    services: dict[str, LocalTeacher],
    flags: list[str],
    key: str,
) -> dict[str, int]:
    """Both trainers at once; when one fails the other is stopped (SIGTERM: it checkpoints)."""
    env = {**os.environ, "OPD_TEACHER_API_KEY": key, "OPD_STUDENT_PUSH_API_KEY": key}
    peer = {"a": "b", "b": "a"}
    procs: dict[str, subprocess.Popen] = {}
    for side in ("a", "b"):
        cmd = [sys.executable, "-m", "opd_cli.main", "train"]
        cmd += ["--config", str(args.config)] if args.config else []
        cmd += ["--student", str(students[side]), "--out", str(args.out / side)]
        cmd += ["--teacher-url", services[peer[side]].http_url, "--student-push-url", services[side].http_url]
        cmd += ["--teacher-follows-student", str(args.follow)]
        prompts = getattr(args, f"{side}_prompts")
        cmd += ["--prompts", prompts] if prompts else []
        with open(args.out / f"trainer-{side}.log", "ab") as log:
            procs[side] = subprocess.Popen([*cmd, *flags], stdout=log, stderr=subprocess.STDOUT, env=env)
        print(
            f"trainer {side}: {students[side].name} against service {peer[side]}; log {log.name}", flush=True
        )
    codes: dict[str, int] = {}
    while len(codes) < len(procs):
        for side, proc in procs.items():
            if side not in codes and proc.poll() is not None:
                codes[side] = proc.returncode
                if proc.returncode:  # its peer would go on against a teacher that no longer learns
                    other = procs[peer[side]]
                    if other.poll() is None:
                        other.terminate()
        time.sleep(0.5)
    return codes
