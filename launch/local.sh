#!/usr/bin/env bash
# One machine (CPU or a single GPU): set up .venv and the data, then run cfgdiff.main.
#   launch/local.sh WORKDIR [CONFIG] [--mode=sample] [--config.KEY=VALUE ...]
# The JAX build is the one `make` detects (a GPU: cuda12/cuda13, a TPU VM: tpu, else cpu);
# ACCEL=cpu|cuda12|cuda13|tpu launch/local.sh ... names it.
set -euo pipefail
cd "$(dirname "$0")/.."
make --no-print-directory setup
WORKDIR=$1
CONFIG=${2:-experiments/fashion_mnist.py}
exec .venv/bin/python -m cfgdiff.main --config="$CONFIG" --workdir="$WORKDIR" "${@:3}"
