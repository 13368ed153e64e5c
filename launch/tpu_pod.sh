#!/usr/bin/env bash
# Runs one training command on every host of a Cloud TPU VM slice.
#
# JAX on a TPU pod is multi-controller: each host runs the same program and
# spactor_jax.runtime.initialize() calls jax.distributed.initialize() with no
# arguments, which finds the other hosts through the TPU metadata server. This
# script sends the same command to all workers with
#   gcloud compute tpus tpu-vm ssh TPU_NAME --worker=all --command=...
# MODEL_DIR should be a gs:// path that every host can write (orbax writes the
# checkpoint shards from every host; only process 0 writes logs/summaries).
set -euo pipefail

# ---- Settings (environment variables override the defaults; flags override both).
TPU_NAME="${TPU_NAME:-}"                 # -t: name of the TPU VM slice (required)
ZONE="${ZONE:-}"                         # -z: its zone, e.g. us-central2-b (required)
PROJECT="${PROJECT:-}"                   # -P: GCP project; empty = gcloud's default
REPO_DIR="${REPO_DIR:-~/spactor-jax}"    # -r: checkout of this repository on every host
PYTHON="${PYTHON:-python3}"              # interpreter on the hosts (with jax[tpu] installed)
SETUP_COMMAND="${SETUP_COMMAND:-}"       # -s: run on every host first, e.g. "git pull && pip install -e ."
LOG_FILE="${LOG_FILE:-}"                 # -l: also tee each host's output to this file on the host
DRY_RUN="${DRY_RUN:-0}"                  # -n: print the gcloud command instead of running it

usage() {
  cat <<EOF
Usage: $(basename "$0") -t TPU_NAME -z ZONE [-P PROJECT] [-r REPO_DIR] [-s SETUP_COMMAND] [-l LOG_FILE] [-n]
                         MODEL_DIR GIN_FILE[,GIN_FILE...] [EXTRA_ARGS...]

Runs on every worker of TPU_NAME:
  cd REPO_DIR && [SETUP_COMMAND &&] \$PYTHON -m spactor_jax.train \\
      --gin_file=GIN_FILE ... --gin.MODEL_DIR="'MODEL_DIR'" EXTRA_ARGS

  -t NAME   TPU VM name                      (env TPU_NAME)
  -z ZONE   zone                             (env ZONE)
  -P PROJ   GCP project                      (env PROJECT)
  -r DIR    repository checkout on the hosts (env REPO_DIR, default $REPO_DIR)
  -s CMD    setup command run first on every host (env SETUP_COMMAND)
  -l FILE   tee output to FILE on each host  (env LOG_FILE)
  -n        dry run: print the gcloud command (env DRY_RUN=1)
  -h        this help

Environment: PYTHON (interpreter on the hosts, default $PYTHON).
Example:
  $(basename "$0") -t my-v4-128 -z us-central2-b gs://bucket/runs/base \\
      gin_configs/models/base.gin,gin_configs/runs/pretrain.gin --gin.TRAIN_STEPS=100000
EOF
}

while getopts ":t:z:P:r:s:l:nh" opt; do
  case "$opt" in
    t) TPU_NAME="$OPTARG" ;;
    z) ZONE="$OPTARG" ;;
    P) PROJECT="$OPTARG" ;;
    r) REPO_DIR="$OPTARG" ;;
    s) SETUP_COMMAND="$OPTARG" ;;
    l) LOG_FILE="$OPTARG" ;;
    n) DRY_RUN=1 ;;
    h) usage; exit 0 ;;
    :) echo "error: -$OPTARG needs a value" >&2; usage >&2; exit 2 ;;
    *) echo "error: unknown option -$OPTARG" >&2; usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ -z "$TPU_NAME" || -z "$ZONE" || $# -lt 2 ]]; then
  echo "error: -t TPU_NAME, -z ZONE, MODEL_DIR and GIN_FILE are required" >&2
  usage >&2
  exit 2
fi
MODEL_DIR="$1"
GIN_FILES="$2"
shift 2

# Build the remote command with every argument shell-quoted once.
train=("$PYTHON" -m spactor_jax.train)
IFS=',' read -r -a gin_files <<<"$GIN_FILES"
for gin_file in "${gin_files[@]}"; do
  train+=("--gin_file=$gin_file")
done
train+=("--gin.MODEL_DIR='$MODEL_DIR'" "$@")
remote="cd $REPO_DIR && "  # REPO_DIR unquoted so that ~ expands on the host.
if [[ -n "$SETUP_COMMAND" ]]; then
  remote+="$SETUP_COMMAND && "
fi
remote+="$(printf '%q ' "${train[@]}")"
if [[ -n "$LOG_FILE" ]]; then
  remote="set -o pipefail; { $remote; } 2>&1 | tee $(printf '%q' "$LOG_FILE")"
fi

cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--zone=$ZONE" --worker=all "--command=$remote")
if [[ -n "$PROJECT" ]]; then
  cmd+=("--project=$PROJECT")
fi

if [[ "$DRY_RUN" == 1 ]]; then
  echo "# on every worker: $remote"
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
