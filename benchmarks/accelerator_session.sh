#!/usr/bin/env bash
# One accelerator session in two steps (benchmarks/accelerator_session.py says
# what each measures; docs/scale_out.md says how to run them):
#
#   benchmarks/accelerator_session.sh prepare [--tiny]
#       here, where TensorFlow, seqio and t5 are installed: pre-builds the input
#       into .accelerator/, downloads the wheels the accelerator machine lacks
#       into .accelerator/wheels and prints the size that will travel.
#   benchmarks/accelerator_session.sh run
#       on the accelerator machine (or a CPU rehearsal), with OUT set: installs
#       the carried wheels offline into a scratch folder, puts the repository on
#       PYTHONPATH (its TensorFlow dependencies are not installed) and measures,
#       writing $OUT/accelerator_session.json.
#
# PYTHON (default python3) is the interpreter, ACCELERATOR_DIR (default
# .accelerator) the carried folder, BUDGET_S (default 540) the
# seconds the run step may take in all, within the device's 10-minute limit.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
DIR="${ACCELERATOR_DIR:-$ROOT/.accelerator}"
step="${1:-}"
[ $# -gt 0 ] && shift
case "$step" in
  prepare)
    exec "$PYTHON" "$ROOT/benchmarks/accelerator_session.py" prepare --dir "$DIR" "$@" ;;
  run)
    : "${OUT:?error: set OUT to the folder the results go to}"
    if compgen -G "$DIR/wheels/*.whl" > /dev/null; then
      site="$(mktemp -d)"
      "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$site" "$DIR"/wheels/*.whl
      export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    # The training children allocate device memory of their own beside the driver's.
    export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
    exec "$PYTHON" "$ROOT/benchmarks/accelerator_session.py" run --dir "$DIR" --out "$OUT" \
      --budget_s "${BUDGET_S:-540}" "$@" ;;
  *)
    echo "error: usage: $0 prepare [--tiny] | run   (see the header of $0)" >&2
    exit 2 ;;
esac
