"""ml_collections configs, one file per setup; `get_experiment(name)` loads one by name."""

import importlib

import ml_collections


def get_experiment(name: str) -> ml_collections.ConfigDict:
  """The config of ``experiments/<name>.py``."""
  return importlib.import_module(f"experiments.{name}").get_config()
