"""The sweep's results store: its rows, their keys and the files that hold them.

WORKDIR/sweep/results.csv holds one row per evaluated cell (run, step, w and every setting
that changes the samples or the scores, SETTINGS, the guidance method and the network
guiding it among them); a cell's key (`cell_key`) is what a
resumed sweep skips and what the report groups by. A cell's bootstrap replicates sit in
WORKDIR/sweep/replicates/<hash of its key>.npz. Rows are text as written: `as_written`
makes a row just scored compare equal to the same row read back.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math

import ml_collections
import numpy as np

from cfgdiff import configs, files

# Every setting that changes the samples or the scores is a column and part of a cell's
# key: a row is never reused for, or tabulated beside, another setting.
SETTINGS = ("method", "guide_by", "sampler", "steps", "num_samples",
            *(c for o in configs.TRACED_SAMPLE_OPTIONS for c in o.columns), "seed",
            "feature_net", "metrics", "score_splits", "bootstrap")

COLUMNS = ("run", "step", "p_uncond", "w", *SETTINGS, "fid", "fid_se", "fid_floor", "is_mean",
           "is_mean_se", "precision", "precision_se", "recall", "recall_se", "accuracy",
           "accuracy_se", "nfe_per_sample", "backward_per_sample", "seconds_per_sample")

# Rows written before a setting existed hold what it then was.
ABSENT_SETTINGS = {"method": "cfg"}

# Bump when a metric's definition changes, so rows scored the old way are never reused
# or tabulated beside new ones. 2: the score over contiguous splits (whole set by
# default), the classifier's reference on the training split and its floor on
# class-balanced test images, bootstrap standard errors.
METRICS_VERSION = "2"



def settings(config: ml_collections.ConfigDict, method: str = "cfg",
             guide_by: str = "") -> dict[str, str]:
  """The sweep's sample- and score-changing settings, as they are written to the CSV.
  ``method``: the guidance method; ``guide_by``: the network it reads beside the denoiser
  (`sampling.GuideHelper.describe`, '' for 'cfg')."""
  sw, sc = config.sweep, config.sample
  feature_net = sw.feature_net
  if feature_net == "inception":
    feature_net += ":" + (sw.inception_weights.rstrip("/").split("/")[-1] or "default")
  if method == "classifier":
    guide_by += f", {sc.classifier_model} denoiser"
  values = dict(method=method, guide_by=guide_by, sampler=sw.sampler, steps=sw.num_steps,
                num_samples=sw.num_samples)
  for option in configs.TRACED_SAMPLE_OPTIONS:
    value = sc[option.key]
    values.update(zip(option.columns, value if len(option.columns) > 1 else (value,),
                      strict=True))
  values.update(seed=config.seed, feature_net=feature_net, metrics=METRICS_VERSION,
                score_splits=sw.score_splits, bootstrap=sw.bootstrap)
  return {k: str(v) for k, v in values.items()}



def canonical(value: str) -> str:
  """One spelling per value ('4', '4.0' -> '4.0'), so a CSV row read back matches the
  config it came from."""
  try:
    return repr(float(value))
  except ValueError:
    return value



def setting_key(row: dict) -> tuple:
  """A row's settings, read back from the CSV (strings) or just computed (any type);
  missing columns (rows of an older sweep) are ''."""
  return tuple(canonical(str(ABSENT_SETTINGS.get(k, "")) if row.get(k) is None else str(row[k]))
               for k in SETTINGS)



# The settings that say how a cell was guided; the others are shared by the methods a
# comparison puts side by side.
GUIDANCE_SETTINGS = ("method", "guide_by")


def shared_key(row: dict) -> tuple:
  """A row's settings other than its guidance (GUIDANCE_SETTINGS)."""
  return tuple(v for k, v in zip(SETTINGS, setting_key(row), strict=True)
               if k not in GUIDANCE_SETTINGS)


def guidance_key(row: dict) -> tuple[str, str]:
  """(method, guide_by) of a row."""
  key = dict(zip(SETTINGS, setting_key(row), strict=True))
  return key["method"], key["guide_by"]


def cell_key(row: dict) -> tuple:
  return (row["run"], int(row["step"]), float(row["w"])) + setting_key(row)



def number(value) -> float:
  """A CSV or JSON field as a float; empty or missing is NaN."""
  return math.nan if value in (None, "") else float(value)



def as_written(row: dict) -> dict[str, str]:
  """A row as results.csv stores it and read_results returns it: every value text (None
  as ''), so rows just evaluated and rows read back compare alike."""
  return {k: "" if v is None else str(v) for k, v in row.items()}



def read_results(path: str) -> list[dict]:
  if not files.path(path).exists():
    return []
  return list(csv.DictReader(io.StringIO(files.path(path).read_text())))



def write_results(path: str, rows: list[dict]) -> None:
  buffer = io.StringIO()
  # Rows of an older sweep lack the newer setting columns: left empty, never matched.
  # Columns only they have (is_std before version 2) are kept after the current ones.
  extra = sorted({k for r in rows for k in r} - set(COLUMNS))
  writer = csv.DictWriter(buffer, fieldnames=(*COLUMNS, *extra), restval="")
  writer.writeheader()
  writer.writerows(rows)
  files.write_atomic(path, buffer.getvalue())



def replicates_path(out_dir, row: dict) -> str:
  """WORKDIR/sweep/replicates/<hash of the cell>.npz: a cell's bootstrap replicates."""
  key = repr(cell_key(row))
  return str(files.path(out_dir) / "replicates" /
             f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz")



def write_replicates(path: str, replicates: dict[str, np.ndarray]) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **replicates)
  files.write_atomic(path, buffer.getvalue())



def read_replicates(path: str) -> dict[str, np.ndarray] | None:
  location = files.path(path)
  if not location.exists():
    return None
  with np.load(io.BytesIO(location.read_bytes())) as f:
    return {k: f[k] for k in f.files}



def latest_rows(rows: list[dict]) -> tuple[list[dict], dict[str, int]]:
  """The rows of each run's latest evaluated step, and that step per run."""
  latest: dict[str, int] = {}
  for row in rows:
    latest[row["run"]] = max(latest.get(row["run"], -1), int(row["step"]))
  return [r for r in rows if int(r["step"]) == latest[r["run"]]], latest
