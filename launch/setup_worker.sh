#!/usr/bin/env bash
# Prepares one host (a TPU VM worker, a GPU node) to run cfgdiff from this checkout:
# finds a Python >= 3.11 (installing python3.11 with apt where the image has only 3.10,
# as Ubuntu 22.04 TPU VM images do), makes .venv and installs cfgdiff with the JAX build
# for the accelerator. Safe to run again: an up-to-date .venv is kept.
#
#   launch/setup_worker.sh [JAX_REQUIREMENT]     e.g. 'jax[tpu]' (default), 'jax[cuda12]',
#                                                'jax[cuda13]', jax (CPU), or another pip spec
# JAX's own builds become cfgdiff's extras of the same name (cfgdiff[train,tpu], setup.py;
# `make ACCEL=...` installs the same); any other spec (a pinned jax, a wheel) is installed
# beside cfgdiff[train]. Nothing here checks the machine: a SLURM login node that prepares
# a shared checkout for GPU nodes usually has no GPU itself.
#   launch/setup_worker.sh --python-only         only find (or install) Python >= 3.11
#
# CFGDIFF_VENV=/path/to/env  use an environment that already has cfgdiff's dependencies
#                            (a prepared VM image) instead of making .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_ONLY=
if [[ "${1:-}" == --python-only ]]; then PYTHON_ONLY=1; shift; fi
JAX_REQUIREMENT=${1:-jax[tpu]}

python_at_least_311() {
  "$1" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' 2>/dev/null
}

find_python() {
  local candidate
  for candidate in python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null && python_at_least_311 "$candidate"; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

if [[ -n "${CFGDIFF_VENV:-}" && -z "$PYTHON_ONLY" ]]; then
  if ! python_at_least_311 "$CFGDIFF_VENV/bin/python"; then
    echo "setup_worker: CFGDIFF_VENV=$CFGDIFF_VENV has no Python >= 3.11." >&2
    exit 2
  fi
  if [[ -d .venv && ! -L .venv ]]; then
    echo "setup_worker: .venv is a directory here; remove it to use CFGDIFF_VENV." >&2
    exit 2
  fi
  ln -sfn "$CFGDIFF_VENV" .venv
  echo "setup_worker: using the prepared environment $CFGDIFF_VENV"
  exit 0
fi

if ! PYTHON=$(find_python); then
  echo "setup_worker: $(python3 --version 2>&1 || echo 'no python3') found; cfgdiff needs" \
       "Python >= 3.11. Installing python3.11 with apt (Ubuntu 22.04 ships it)."
  SUDO=$([[ $(id -u) == 0 ]] || echo sudo)
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq python3.11 python3.11-venv
  PYTHON=$(find_python) || { echo "setup_worker: no Python >= 3.11 after apt." >&2; exit 2; }
fi

if [[ -n "$PYTHON_ONLY" ]]; then
  echo "setup_worker: $PYTHON ($("$PYTHON" --version 2>&1))"
  exit 0
fi
stamp=".venv/.installed-$(sha1sum setup.py | cut -c1-12)-${JAX_REQUIREMENT//[^a-z0-9]/_}"
if [[ -f "$stamp" ]]; then
  echo "setup_worker: .venv is up to date ($("$PYTHON" --version))"
  exit 0
fi
if [[ -e .venv ]] && ! python_at_least_311 .venv/bin/python; then
  rm -rf .venv  # made by an older Python (e.g. the image's 3.10): venv would keep it
fi
case "$JAX_REQUIREMENT" in
  jax) install=(-e ".[train]") ;;
  "jax[cuda12]" | "jax[cuda13]" | "jax[tpu]")
    install=(-e ".[train,${JAX_REQUIREMENT:4:-1}]") ;;  # jax[X] -> cfgdiff[train,X]
  *) install=(-e ".[train]" "$JAX_REQUIREMENT") ;;
esac
"$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${install[@]}"
touch "$stamp"
echo "setup_worker: installed cfgdiff and $JAX_REQUIREMENT with $(.venv/bin/python --version)"
