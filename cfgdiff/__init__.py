"""cfgdiff: classifier-free diffusion guidance (Ho & Salimans 2022) in JAX/Flax."""

import sys

__version__ = "0.1.0"

# jax 0.10 and flax 0.12 need Python 3.11; on 3.10 they fail deep inside an import.
MIN_PYTHON = (3, 11)
if sys.version_info[:2] < MIN_PYTHON:
  raise ImportError(
      f"cfgdiff needs Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}, this is "
      f"{sys.version.split()[0]} ({sys.executable}); on Ubuntu 22.04 (TPU VM images) run "
      "`sudo apt-get install -y python3.11 python3.11-venv` and make the venv with "
      "python3.11 (launch/setup_worker.sh does).")
