#!/usr/bin/env bash
# Runs N JAX processes on this machine, each with D fake CPU devices, joined by
# jax.distributed (coordinator on 127.0.0.1, gloo collectives). Use it to try a
# multi-host configuration (sharded data loading, checkpointing from every
# process, the process-0-only logging) without a cluster.
#
# Every process runs
#   $PYTHON -u -m $MODULE --gin_file=G1 [--gin_file=G2 ...] --gin.MODEL_DIR="'DIR'" [EXTRA_ARGS...]
# with SPACTOR_COORDINATOR, SPACTOR_NUM_PROCESSES and SPACTOR_PROCESS_ID set,
# which spactor_jax.runtime.initialize reads. Output lines are prefixed with
# "[pI] ". When one process fails, the others are stopped and the script exits
# with the failing process's status; Ctrl-C stops all of them.
set -euo pipefail

# ---- Settings (environment variables override the defaults; flags override both).
NUM_PROCESSES="${NUM_PROCESSES:-2}"        # -n: processes to start
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"  # -d: fake CPU devices per process
PORT="${PORT:-}"                            # -p: coordinator port; empty = a free one
MODULE="${MODULE:-spactor_jax.train}"       # -m: Python module each process runs
PYTHON="${PYTHON:-python}"                  # interpreter (e.g. /work/venv/bin/python)
GRACE_SECONDS="${GRACE_SECONDS:-120}"       # wait after SIGTERM (agreed stop + save) before SIGKILL

usage() {
  cat <<EOF
Usage: $(basename "$0") [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] [-m MODULE]
                         MODEL_DIR GIN_FILE[,GIN_FILE...] [EXTRA_ARGS...]

Starts NUM_PROCESSES (default $NUM_PROCESSES) local processes of
  \$PYTHON -m MODULE --gin_file=... --gin.MODEL_DIR="'MODEL_DIR'" EXTRA_ARGS
each with XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES_PER_PROCESS
(default $DEVICES_PER_PROCESS) and JAX_PLATFORMS=cpu, coordinated on 127.0.0.1.

  -n N    number of processes                 (env NUM_PROCESSES)
  -d D    fake CPU devices per process        (env DEVICES_PER_PROCESS)
  -p P    coordinator port, default: a free one (env PORT)
  -m M    Python module, default spactor_jax.train (env MODULE)
  -h      this help

Environment: PYTHON (interpreter, default "python"), GRACE_SECONDS.
Example:
  $(basename "$0") -n 2 -d 4 /tmp/run gin_configs/quickstart.gin --gin.TRAIN_STEPS=20
EOF
}

while getopts ":n:d:p:m:h" opt; do
  case "$opt" in
    n) NUM_PROCESSES="$OPTARG" ;;
    d) DEVICES_PER_PROCESS="$OPTARG" ;;
    p) PORT="$OPTARG" ;;
    m) MODULE="$OPTARG" ;;
    h) usage; exit 0 ;;
    :) echo "error: -$OPTARG needs a value" >&2; usage >&2; exit 2 ;;
    *) echo "error: unknown option -$OPTARG" >&2; usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ $# -lt 2 ]]; then
  echo "error: MODEL_DIR and GIN_FILE are required" >&2
  usage >&2
  exit 2
fi
MODEL_DIR="$1"
GIN_FILES="$2"
shift 2
for value in "$NUM_PROCESSES" "$DEVICES_PER_PROCESS"; do
  if ! [[ "$value" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: -n and -d must be positive integers, got '$value'" >&2
    exit 2
  fi
done

if [[ -z "$PORT" ]]; then
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

ARGS=()
IFS=',' read -r -a gin_files <<<"$GIN_FILES"
for gin_file in "${gin_files[@]}"; do
  ARGS+=("--gin_file=$gin_file")
done
ARGS+=("--gin.MODEL_DIR='$MODEL_DIR'" "$@")

PIDS=()
declare -A RANK_OF=()
stop_all() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  local deadline=$((SECONDS + GRACE_SECONDS))
  for pid in "${PIDS[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

echo "starting $NUM_PROCESSES processes x $DEVICES_PER_PROCESS devices, coordinator 127.0.0.1:$PORT" >&2
for ((i = 0; i < NUM_PROCESSES; i++)); do
  SPACTOR_COORDINATOR="127.0.0.1:$PORT" \
  SPACTOR_NUM_PROCESSES="$NUM_PROCESSES" \
  SPACTOR_PROCESS_ID="$i" \
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
    "$PYTHON" -u -m "$MODULE" "${ARGS[@]}" > >(sed -u "s/^/[p$i] /") 2>&1 &
  PIDS+=("$!")
  RANK_OF[$!]="$i"
done

# Wait for the processes one by one; the first failure stops the rest.
remaining=("${PIDS[@]}")
while ((${#remaining[@]} > 0)); do
  status=0
  wait -n -p finished "${remaining[@]}" || status=$?
  if ((status != 0)); then
    echo "process ${RANK_OF[$finished]} (pid $finished) failed with exit status $status; stopping the others" >&2
    stop_all
    wait 2>/dev/null || true
    exit "$status"
  fi
  next=()
  for pid in "${remaining[@]}"; do
    [[ "$pid" == "$finished" ]] || next+=("$pid")
  done
  remaining=("${next[@]}")
done
wait  # let the log prefixers flush
echo "all $NUM_PROCESSES processes finished" >&2
