#!/usr/bin/env bash
# Runs cfgdiff on every worker of a Cloud TPU VM slice, detached from this ssh session.
#
#   launch/tpu_pod.sh TPU_NAME ZONE WORKDIR [CONFIG] [--mode=sweep] [--config.KEY=V ...]
#
# On each worker it (1) clones the repository into ~/cfgdiff from CFGDIFF_REPO (or
# updates it to CFGDIFF_REF), (2) runs launch/setup_worker.sh (Python >= 3.11, .venv,
# cfgdiff and jax[tpu]), (3) starts `python -m cfgdiff.main --multihost ...` under
# launch/detached.sh, so a dropped connection does not stop it; jax.distributed finds the
# slice's other workers by itself. WORKDIR must be on GCS (gs://...), seen by all workers.
#
# Follow a job, wait for it, or stop it (NAME is 'train' or 'sweep', from --mode):
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=0 \
#       --command 'tail -f ~/cfgdiff_jobs/train/log'
#   CFGDIFF_WAIT=1 launch/tpu_pod.sh ...      waits and exits with worker 0's status
#
# Preemption / maintenance: the workers get SIGTERM; cfgdiff saves at the next step and
# exits 75. A hung worker makes the others exit 77 after runtime.step_timeout_seconds.
# On 75 or 77 run the same command again to resume from the newest readable checkpoint
# (or use a queued resource); on 76 (another job took the workdir) or 78 (diverged, see
# WORKDIR/diverged.json) do not. A second training job on a workdir whose first job is
# still alive is refused (WORKDIR/train.lock); a worker that rebooted takes it at once.
#
# Table 1: three training runs (--config.diffusion.p_uncond=0.1/0.2/0.5, workdirs
# gs://BUCKET/table1/p_uncond_0.1 ...) and, on a second slice, one evaluation job that
# polls them all and writes FID and IS rows as checkpoints appear:
#   launch/tpu_pod.sh EVAL_TPU ZONE gs://BUCKET/table1 experiments/imagenet64.py \
#       --mode=sweep --config.sweep.poll_seconds=1800
#
# Environment: CFGDIFF_REPO (git URL to clone), CFGDIFF_REF (branch/commit, optional),
# CFGDIFF_JAX (default 'jax[tpu]'), CFGDIFF_VENV (a prepared environment, optional),
# CFGDIFF_WAIT=1 (wait for the job).
set -euo pipefail
if (( $# < 3 )); then
  sed -n '2,9p' "$0" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 WORKDIR=$3
CONFIG=${4:-experiments/imagenet64.py}
shift $(( $# < 4 ? $# : 4 ))
JOB=train
for arg in "$@"; do
  case "$arg" in --mode=*) JOB=${arg#--mode=} ;; esac
done
quoted_args=$(printf ' %q' "$@")

run_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}

if [[ -n "${CFGDIFF_REPO:-}" ]]; then
  run_all "[ -d ~/cfgdiff/.git ] || git clone -q $(printf %q "$CFGDIFF_REPO") ~/cfgdiff"
fi
if [[ -n "${CFGDIFF_REF:-}" ]]; then
  run_all "cd ~/cfgdiff && git fetch -q origin $(printf %q "$CFGDIFF_REF") && \
    git checkout -q --detach FETCH_HEAD"
fi
run_all "cd ~/cfgdiff && CFGDIFF_VENV=$(printf %q "${CFGDIFF_VENV:-}") \
  launch/setup_worker.sh $(printf %q "${CFGDIFF_JAX:-jax[tpu]}")"
run_all "cd ~/cfgdiff && launch/detached.sh start $JOB .venv/bin/python -m cfgdiff.main \
  --multihost --config=$(printf %q "$CONFIG") --workdir=$(printf %q "$WORKDIR")$quoted_args"
echo "tpu_pod: $JOB started on every worker of $TPU_NAME; log on each: ~/cfgdiff_jobs/$JOB/log"

if [[ -n "${CFGDIFF_WAIT:-}" ]]; then
  # Every worker waits for its own process; the slice's status is the worst of them.
  run_all "~/cfgdiff/launch/detached.sh wait $JOB"
fi
