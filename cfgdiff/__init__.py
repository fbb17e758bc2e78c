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

_API = ("load", "Model", "ModelNotFoundError", "guided_sample")


def __getattr__(name: str):
  """cfgdiff.load, cfgdiff.Model, cfgdiff.guided_sample (cfgdiff/api.py), imported on first
  use so that `import cfgdiff` stays light (no JAX) for tools that only read its version."""
  if name in _API:
    from cfgdiff import api  # pylint: disable=g-import-not-at-top
    return getattr(api, name)
  raise AttributeError(f"module 'cfgdiff' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted([*globals(), *_API])
