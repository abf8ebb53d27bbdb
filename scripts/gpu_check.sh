#!/usr/bin/env bash
# The prepared accelerator check (docs/benchmarks.md): `opd bench gpu` under a hard time limit, so it ends
# even if a part hangs. On a CUDA machine it builds random-weight models of real sizes (no downloads) and
# measures the service against the raw forward and one trainer step; on a CPU it runs the tiny sizes.
#
#   scripts/gpu_check.sh --out gpu_check.json [other `opd bench gpu` flags]
#
# The check keeps inside its own --budget-s (9 min by default) and rewrites the JSON after every part; the
# limit here (GPU_CHECK_TIMEOUT_S, 600 s) only catches a part that overruns. opd is .venv/bin/opd unless
# OPD names another.
set -euo pipefail
cd "$(dirname "$0")/.."
OPD=${OPD:-.venv/bin/opd}
# SIGTERM first (the check stops its service processes and keeps the JSON), SIGKILL 20 s later.
exec timeout --signal=TERM --kill-after=20 "${GPU_CHECK_TIMEOUT_S:-600}" "$OPD" bench gpu "$@"
