#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: the same command runs on every worker, and
# jax.distributed.initialize() (--multihost) discovers the slice by itself.
#
#   launch/tpu_pod.sh TPU_NAME ZONE gs://BUCKET/workdir [experiments/imagenet64.py] [--config.KEY=V ...]
#
# Assumes the repository is cloned at ~/cfgdiff on every worker (the first command does it
# from CFGDIFF_REPO when set) and that the workdir is on GCS, visible to all workers.
# Table 1 is three such runs (--config.diffusion.p_uncond=0.1, 0.2, 0.5, each with its own
# workdir under one parent), then on a second slice, beside them:
#   launch/tpu_pod.sh EVAL_TPU ZONE gs://BUCKET/table1 experiments/imagenet64.py \
#       --mode=sweep --config.sweep.poll_seconds=1800
# Maintenance events send SIGTERM: cfgdiff saves at the next step and exits; run the same
# command again (or use a queued resource) to continue.
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
