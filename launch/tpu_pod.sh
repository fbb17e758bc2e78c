#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: the same command runs on every worker, and
# jax.distributed.initialize() (--multihost) discovers the slice by itself.
#
#   launch/tpu_pod.sh TPU_NAME ZONE gs://BUCKET/workdir [experiments/imagenet64.py] [--config.KEY=V ...]
#
# Assumes the repository is cloned at ~/cfgdiff on every worker (the first command does it
# from CFGDIFF_REPO when set) and that the workdir is on GCS, visible to all workers.
set -euo pipefail
TPU_NAME=$1 ZONE=$2 WORKDIR=$3
CONFIG=${4:-experiments/imagenet64.py}
shift $(( $# < 4 ? $# : 4 ))
EXTRA="$*"
run_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}
if [[ -n "${CFGDIFF_REPO:-}" ]]; then
  run_all "[ -d ~/cfgdiff ] || git clone $CFGDIFF_REPO ~/cfgdiff"
fi
run_all "cd ~/cfgdiff && python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]'"
run_all "cd ~/cfgdiff && .venv/bin/python -m cfgdiff.main --multihost --config=$CONFIG \
  --workdir=$WORKDIR $EXTRA"
