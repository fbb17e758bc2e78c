"""What a resumed run must share with the run that wrote its workdir: the config keys that
shape the training trajectory, and the training data.

WORKDIR/config.json holds the config of the latest run (the sweep reads it);
WORKDIR/config_history.jsonl records every change between runs, one JSON line each;
WORKDIR/data_fingerprint.json holds the training data's size and checksum.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import ml_collections

from cfgdiff import configs, files

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
FINGERPRINT_FILE = "data_fingerprint.json"

# Keys a resumed run may change freely: how long to train, how often to save and log, and
# how the same computation is laid out (data location, input workers, micro-batches,
# kernels). Every other key under these sections (and the seed) changes the trajectory.
TRAJECTORY_SECTIONS = ("seed", "data", "model", "diffusion", "train")
FREE_KEYS = frozenset((
    "data.path", "data.num_workers", "train.num_steps", "train.checkpoint_every_steps",
    "train.keep_checkpoints", "train.log_every_steps", "train.kernel_gradient",
    "train.microbatch_size", "train.max_nonfinite_steps"))
# Keys whose change makes the checkpoint unreadable: never allowed on resume.
SHAPE_SECTIONS = ("model",)
SHAPE_KEYS = frozenset(("data.image_size", "data.channels", "data.num_classes"))


class ResumeError(RuntimeError):
  """The run would resume under a different trajectory or data; the message says how to
  restore it."""


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out |= _flat(value, f"{prefix}{key}.")
    else:
      out[f"{prefix}{key}"] = value
  return out


def changes(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
  """(key, saved value, current value) for every leaf that differs; a key the saved config
  lacks (added to cfgdiff since) counts as its default, which that run used."""
  defaults = _flat(json.loads(configs.default_config().to_json_best_effort()))
  was, now = defaults | _flat(saved), _flat(current)
  return [(k, was.get(k), v) for k, v in now.items() if was.get(k) != v]


def _override(key: str, value: Any) -> str:
  if isinstance(value, list):
    return f'--config.{key}="{tuple(value)}"'
  return f"--config.{key}={value}"


def _refused(key: str) -> bool:
  return key.split(".")[0] in TRAJECTORY_SECTIONS and key not in FREE_KEYS


def _is_shape(key: str) -> bool:
  return key.split(".")[0] in SHAPE_SECTIONS or key in SHAPE_KEYS


def _record(workdir: str, entry: dict) -> None:
  path = files.path(workdir) / HISTORY_FILE
  old = path.read_text() if path.exists() else ""
  files.write_atomic(path, old + json.dumps(entry) + "\n")


def check_config(config: ml_collections.ConfigDict, workdir: str, step: int,
                 allow_change: bool = False) -> None:
  """Refuses to resume WORKDIR under a config that changes its trajectory; records every
  change (allowed ones too) in config_history.jsonl; writes config.json.

  Args:
    step: the step the run resumes from (0 for a new run).
    allow_change: continue under changed trajectory keys (``--allow_config_change``);
      the model's and the data's shapes can never change.
  """
  path = files.path(workdir) / CONFIG_FILE
  current = json.loads(config.to_json_best_effort())
  found = changes(json.loads(path.read_text()), current) if path.exists() else []
  refused = [c for c in found if _refused(c[0])]
  for key, was, now in refused:
    if _is_shape(key) or not allow_change:
      allow = "" if _is_shape(key) else (
          f", or pass --allow_config_change to continue with the change (recorded in "
          f"{HISTORY_FILE})")
      raise ResumeError(
          f"{workdir} was trained with config.{key}={was!r}, not {now!r}, which changes "
          f"{'what its checkpoints hold' if _is_shape(key) else 'its training trajectory'}"
          f"; resume with {_override(key, was)}{allow}, or use a new --workdir.")
  if jax.process_index() != 0:
    return
  if found:
    _record(workdir, {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_from_step": step,
                      "allowed_by_flag": bool(refused),
                      "changes": [{"key": k, "was": w, "now": n} for k, w, n in found]})
  if found or not path.exists():
    files.write_atomic(path, json.dumps(current, indent=2))


def check_data(fingerprint: dict, workdir: str, step: int, allow_change: bool = False) -> None:
  """Refuses to resume on training data whose fingerprint (`ArraySource.fingerprint`,
  `TfdsSource.fingerprint`) differs from the one the run started on; records it first."""
  path = files.path(workdir) / FINGERPRINT_FILE
  saved = json.loads(path.read_text()) if path.exists() else None
  if saved == fingerprint:
    return
  if saved is not None and step > 0:
    if not allow_change:
      raise ResumeError(
          f"the training data changed since {workdir} started: {saved['examples']} examples "
          f"(checksum {saved['sha256'][:12]}) then, {fingerprint['examples']} "
          f"(checksum {fingerprint['sha256'][:12]}) now. Point config.data.path at the "
          f"original data, pass --allow_config_change to continue on the new data (recorded "
          f"in {HISTORY_FILE}), or use a new --workdir.")
    if jax.process_index() == 0:
      _record(workdir, {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_from_step": step,
                        "allowed_by_flag": True, "data_fingerprint": {"was": saved,
                                                                      "now": fingerprint}})
  if jax.process_index() == 0:
    files.write_atomic(path, json.dumps(fingerprint, indent=2))
