"""--mode=sweep: the paper's w x p_uncond table for every training run under a workdir.

A run is a directory holding ``checkpoints/`` and ``config.json`` (what --mode=train
writes): WORKDIR itself, or each of its sub-directories. For the latest checkpoint of
each run and every w in config.sweep.guidance_weights, it draws config.sweep.num_samples
images (the same labels and seeds at every w), evaluates them, and appends one row to
WORKDIR/sweep/results.csv. Finished cells are skipped, so an interrupted sweep resumes
where it stopped; with sweep.poll_seconds > 0 it keeps waiting for new checkpoints (an
evaluation job beside a training job).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from cfgdiff import (
  checkpoint,
  configs,
  files,
  multihost,
  preemption,
  sampling,
  sources,
  train,
  workdir_lock,
)
from cfgdiff.evaluation import evaluator as evaluator_lib
from cfgdiff.evaluation import metrics as metrics_lib
from cfgdiff.progress import Progress

# Every setting that changes the samples or the scores is a column and part of a cell's
# key: a row is never reused for, or tabulated beside, another setting.
SETTINGS = ("sampler", "steps", "num_samples", "v", "interval_lo", "interval_hi", "rescale",
            "threshold", "clip_x", "seed", "feature_net", "metrics", "score_splits",
            "bootstrap")
COLUMNS = ("run", "step", "p_uncond", "w", *SETTINGS, "fid", "fid_se", "fid_floor", "is_mean",
           "is_mean_se", "precision", "precision_se", "recall", "recall_se", "accuracy",
           "accuracy_se")
# Bump when a metric's definition changes, so rows scored the old way are never reused
# or tabulated beside new ones. 2: the score over contiguous splits (whole set by
# default), the classifier's reference on the training split and its floor on
# class-balanced test images, bootstrap standard errors.
METRICS_VERSION = "2"
# A difference between two weights is called resolved when it exceeds this many paired
# standard errors.
RESOLVED_SE = 2.0
# How many times a sweep re-reads the newest step when the one it chose was deleted by
# the training job (keep_checkpoints) before it could be restored.
RESTORE_ATTEMPTS = 5
GRID_PER_CLASS = 8
GRID_CLASSES = 10  # the sample grid shows the first classes only (ImageNet has 1000)


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  path: str
  config: ml_collections.ConfigDict


def find_runs(workdir: str) -> list[Run]:
  """WORKDIR if it is a training run, else its sub-directories that are, as process 0
  lists them (every host then reads the same runs' configs)."""
  def is_run(path):
    return (path / "checkpoints").is_dir() and (path / "config.json").exists()
  paths = []
  if jax.process_index() == 0:
    root = files.path(workdir)
    if is_run(root):
      paths = [str(root)]
    elif root.is_dir():
      paths = sorted(str(p) for p in root.iterdir() if is_run(p))
  return [Run(files.path(p).name, p, configs.from_json(str(files.path(p) / "config.json")))
          for p in multihost.agreed(paths)]


def sweep_labels(num_samples: int, num_classes: int) -> np.ndarray:
  """Classes taken in turn, so every prefix of the samples is class-balanced."""
  return (np.arange(num_samples) % num_classes).astype(np.int32)


def read_results(path: str) -> list[dict]:
  if not files.path(path).exists():
    return []
  return list(csv.DictReader(io.StringIO(files.path(path).read_text())))


def _as_written(row: dict) -> dict[str, str]:
  """A row as results.csv stores it and read_results returns it: every value text (None
  as ''), so rows just evaluated and rows read back compare alike."""
  return {k: "" if v is None else str(v) for k, v in row.items()}


def _write_results(path: str, rows: list[dict]) -> None:
  buffer = io.StringIO()
  # Rows of an older sweep lack the newer setting columns: left empty, never matched.
  # Columns only they have (is_std before version 2) are kept after the current ones.
  extra = sorted({k for r in rows for k in r} - set(COLUMNS))
  writer = csv.DictWriter(buffer, fieldnames=(*COLUMNS, *extra), restval="")
  writer.writeheader()
  writer.writerows(rows)
  files.write_atomic(path, buffer.getvalue())


def settings(config: ml_collections.ConfigDict) -> dict[str, str]:
  """The sweep's sample- and score-changing settings, as they are written to the CSV."""
  sw, sc = config.sweep, config.sample
  feature_net = sw.feature_net
  if feature_net == "inception":
    feature_net += ":" + (sw.inception_weights.rstrip("/").split("/")[-1] or "default")
  values = dict(sampler=sw.sampler, steps=sw.num_steps, num_samples=sw.num_samples, v=sc.v,
                interval_lo=sc.guidance_interval[0], interval_hi=sc.guidance_interval[1],
                rescale=sc.rescale, threshold=sc.threshold, clip_x=bool(sc.clip_x),
                seed=config.seed, feature_net=feature_net, metrics=METRICS_VERSION,
                score_splits=sw.score_splits, bootstrap=sw.bootstrap)
  return {k: str(v) for k, v in values.items()}


def _canonical(value: str) -> str:
  """One spelling per value ('4', '4.0' -> '4.0'), so a CSV row read back matches the
  config it came from."""
  try:
    return repr(float(value))
  except ValueError:
    return value


def _setting_key(row: dict) -> tuple:
  """A row's settings, read back from the CSV (strings) or just computed (any type);
  missing columns (rows of an older sweep) are ''."""
  return tuple(_canonical("" if row.get(k) is None else str(row[k])) for k in SETTINGS)


def _cell_key(row: dict) -> tuple:
  return (row["run"], int(row["step"]), float(row["w"])) + _setting_key(row)


def _fmt(value: float, digits: int = 2) -> str:
  return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else (
      f"{value:.{digits}f}")


def _number(value) -> float:
  """A CSV or JSON field as a float; empty or missing is NaN."""
  return math.nan if value in (None, "") else float(value)


def _with_error(values: dict, key: str, digits: int) -> str:
  """'62.01 ± 1.83', or the value alone when it has no standard error."""
  value, error = _number(values.get(key)), _number(values.get(f"{key}_se"))
  text = _fmt(value, digits)
  return text if math.isnan(error) else f"{text} ± {_fmt(error, digits)}"


def replicates_path(out_dir, row: dict) -> str:
  """WORKDIR/sweep/replicates/<hash of the cell>.npz: a cell's bootstrap replicates."""
  key = repr(_cell_key(row))
  return str(files.path(out_dir) / "replicates" /
             f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz")


def _write_replicates(path: str, replicates: dict[str, np.ndarray]) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **replicates)
  files.write_atomic(path, buffer.getvalue())


def read_replicates(path: str) -> dict[str, np.ndarray] | None:
  location = files.path(path)
  if not location.exists():
    return None
  with np.load(io.BytesIO(location.read_bytes())) as f:
    return {k: f[k] for k in f.files}


def _latest_rows(rows: list[dict]) -> tuple[list[dict], dict[str, int]]:
  """The rows of each run's latest evaluated step, and that step per run."""
  latest: dict[str, int] = {}
  for row in rows:
    latest[row["run"]] = max(latest.get(row["run"], -1), int(row["step"]))
  return [r for r in rows if int(r["step"]) == latest[r["run"]]], latest


def results_markdown(rows: list[dict], floor: dict,
                     replicates: dict[tuple, dict[str, np.ndarray]] | None = None) -> str:
  """One section per distinct setting (sampler, steps, v, ... feature net), each in the
  paper's Table 1 layout; rows of different settings are never in one table.
  ``replicates``: cell key -> bootstrap replicates, for the differences between weights."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault(_setting_key(row), []).append(row)
  sections = []
  for key, group in groups.items():
    described = ", ".join(f"{k}={v}" for k, v in zip(SETTINGS, key, strict=True) if v)
    sections.append((f"### Setting: {described}\n\n" if len(groups) > 1 else "")
                    + _table_markdown(group, floor, replicates or {}))
  return "\n".join(sections)


DIFFERENCE_METRICS = (("FID", "fid", 2), ("score", "is_mean", 2), ("precision", "precision", 3),
                      ("recall", "recall", 3), ("accuracy", "accuracy", 3))


def _table_markdown(rows: list[dict], floor: dict,
                    replicates: dict[tuple, dict[str, np.ndarray]]) -> str:
  """The paper's Table 1 layout: rows w, one column per p_uncond, for FID and for the
  score (the latest step of each run), then precision, recall and class accuracy, each
  value ± its bootstrap standard error; then the differences between adjacent weights."""
  rows, latest = _latest_rows(rows)
  runs = sorted({(float(r["p_uncond"]), r["run"]) for r in rows})
  names = {run: f"p_uncond={p:g}" for p, run in runs}
  if len(set(names.values())) < len(names):
    names = {run: f"{run} (p_uncond={p:g})" for p, run in runs}
  weights = sorted({float(r["w"]) for r in rows})
  cell = {(r["run"], float(r["w"])): r for r in rows}
  first = rows[0] if rows else {}
  lines = [f"Sampler {first.get('sampler')}, {first.get('steps')} steps, "
           f"{first.get('num_samples')} samples per cell (the same seeds and labels at every "
           "w); checkpoint steps "
           + ", ".join(f"{names[run]}: {latest[run]}" for _, run in runs) + ". "
           + (f"± is one bootstrap standard error ({first.get('bootstrap')} replicates)."
              if _number(first.get("bootstrap")) > 0 else "No standard errors (bootstrap 0)."),
           ""]
  for title, keys, digits in (("FID (lower is better)", ("fid",), 2),
                              ("Inception-style score (higher is better)", ("is_mean",), 2),
                              ("Precision / recall (k-NN manifolds)", ("precision", "recall"), 3),
                              ("Accuracy on the requested class", ("accuracy",), 3)):
    lines += [f"**{title}**", "", "| w | " + " | ".join(names[run] for _, run in runs) + " |",
              "|---|" + "---|" * len(runs)]
    for w in weights:
      values = [" / ".join(_with_error(cell[(run, w)], k, digits) for k in keys)
                if (run, w) in cell else "-" for _, run in runs]
      lines.append(f"| {w:g} | " + " | ".join(values) + " |")
    lines.append("")
  accuracy = _number(floor.get("classifier_test_accuracy"))
  count = _number(floor.get("num_images"))
  splits = (f"held-out split {floor.get('floor_split', '?')}, reference: split "
            f"{floor.get('reference_split', '?')}")
  lines.append(f"Real held-out images ({'?' if math.isnan(count) else int(count)}, "
               f"class-balanced where the labels allow; {splits}), against the same reference "
               f"(the floor): FID {_with_error(floor, 'fid', 2)}, score "
               f"{_with_error(floor, 'is_mean', 2)}, precision "
               f"{_with_error(floor, 'precision', 3)}, recall {_with_error(floor, 'recall', 3)}, "
               f"accuracy {_with_error(floor, 'accuracy', 3)}."
               + ("" if math.isnan(accuracy) else
                  f" The feature network's own test accuracy: {100 * accuracy:.2f}%."))
  differences = _differences_markdown(runs, names, weights, cell, replicates)
  return "\n".join(lines + differences) + "\n"


def _paired_changes(a: dict | None, b: dict | None,
                    replicates: dict[tuple, dict[str, np.ndarray]]) -> list[str] | None:
  """Cell b minus cell a for each metric ± its paired bootstrap standard error (the same
  draws over the same seeds in every cell), marked * where resolved; None if either cell
  has no replicates."""
  ra = replicates.get(_cell_key(a)) if a else None
  rb = replicates.get(_cell_key(b)) if b else None
  if ra is None or rb is None:
    return None
  entries = []
  for _, key, digits in DIFFERENCE_METRICS:
    if key not in ra or key not in rb or len(ra[key]) != len(rb[key]):
      entries.append("-")
      continue
    change = _number(b[key]) - _number(a[key])
    error = metrics_lib.standard_error(rb[key] - ra[key])
    mark = " *" if abs(change) > RESOLVED_SE * error else ""
    entries.append(f"{change:+.{digits}f} ± {error:.{digits}f}{mark}")
  return None if all(e == "-" for e in entries) else entries


def _differences_markdown(runs, names, weights, cell, replicates) -> list[str]:
  """The change of each metric ± its paired standard error, marked * where it exceeds
  RESOLVED_SE errors: between adjacent weights of each run, then (several runs) between
  runs of adjacent p_uncond at each weight, where both are at the same step."""
  columns = " | ".join(name for name, _, _ in DIFFERENCE_METRICS)
  rule = "|---|---|" + "---|" * len(DIFFERENCE_METRICS)
  lines = []
  by_weight = []
  for _, run in runs:
    for w0, w1 in zip(weights[:-1], weights[1:], strict=True):
      entries = _paired_changes(cell.get((run, w0)), cell.get((run, w1)), replicates)
      if entries:
        by_weight.append(f"| {names[run]} | {w0:g} → {w1:g} | " + " | ".join(entries) + " |")
  if by_weight:
    lines += ["", f"**Change between adjacent weights** (paired bootstrap over the same "
              f"seeds; * where the change exceeds {RESOLVED_SE:g} standard errors)", "",
              f"| run | w | {columns} |", rule] + by_weight
  by_run = []
  for w in weights:
    for (p0, run0), (p1, run1) in zip(runs[:-1], runs[1:], strict=True):
      if p0 == p1:
        continue  # two runs of one p_uncond: not a p_uncond change
      a, b = cell.get((run0, w)), cell.get((run1, w))
      if a and b and a["step"] != b["step"]:
        continue  # a run still training: the change would mix p_uncond with its length
      entries = _paired_changes(a, b, replicates)
      if entries:
        by_run.append(f"| {w:g} | {names[run0]} → {names[run1]} | " + " | ".join(entries)
                      + " |")
  if by_run:
    lines += ["", f"**Change between adjacent p_uncond at each weight** (runs at the same "
              f"checkpoint step; paired bootstrap over the same seeds and labels; * where "
              f"the change exceeds {RESOLVED_SE:g} standard errors). The error is sampling "
              f"error only: with one training run per p_uncond, it leaves out how much "
              f"retraining with another seed would move a run.", "",
              f"| w | runs | {columns} |", rule] + by_run
  return lines


def plot_tradeoff(rows: list[dict], path: str) -> None:
  """FID against the score, one curve per run (p_uncond), points labelled with w, with
  one-standard-error bars on both."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  figure, axes = plt.subplots(figsize=(6, 4.5))
  rows, _ = _latest_rows(rows)
  for p_uncond, run in sorted({(float(r["p_uncond"]), r["run"]) for r in rows}):
    points = sorted((float(r["w"]), _number(r["is_mean"]), _number(r["fid"]),
                     _number(r.get("is_mean_se")), _number(r.get("fid_se")))
                    for r in rows if r["run"] == run)
    axes.errorbar([p[1] for p in points], [p[2] for p in points],
                  xerr=[0 if math.isnan(p[3]) else p[3] for p in points],
                  yerr=[0 if math.isnan(p[4]) else p[4] for p in points], fmt="o-",
                  capsize=2, label=f"p_uncond={p_uncond:g}")
    for w, score, value, _, _ in points:
      axes.annotate(f"{w:g}", (score, value), textcoords="offset points", xytext=(4, 3),
                    fontsize=7)
  axes.set_xlabel("Inception-style score (classifier)")
  axes.set_ylabel("FID (classifier features)")
  axes.set_title("Guidance trade-off: FID vs score over w (± 1 s.e.)")
  axes.legend()
  figure.tight_layout()
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=120)
  plt.close(figure)
  files.write_atomic(path, buffer.getvalue())


def committed_steps(run: Run) -> list[int]:
  """The run's committed checkpoint steps now, the same on every process."""
  # Process 0 alone lists the folder (a collective Orbax manager would wait for the others).
  return multihost.agreed(checkpoint.saved_steps(run.path) if jax.process_index() == 0 else [])


def latest_step(run: Run) -> int | None:
  """The run's newest checkpoint step now, the same on every process."""
  steps = committed_steps(run)
  return steps[-1] if steps else None


def restore_newest(run: Run, config: ml_collections.ConfigDict,
                   sampler: sampling.CheckpointSampler | None = None
                   ) -> sampling.CheckpointSampler:
  """The run's newest readable checkpoint, sampled with this sweep's config.sample
  options: loaded into ``sampler`` (the run's, from an earlier step: nothing compiles
  again) or a new one.

  Beside a live training job the chosen step can be deleted (train.keep_checkpoints)
  between listing and reading it; then the newest step is listed again and read. A step
  that is still there but cannot be read (damaged files) is left in place for training
  to move aside, and the step before it is read instead, with a warning.
  """
  below = None  # only steps below this one: it, or a newer one, failed while present
  error = None
  for _ in range(RESTORE_ATTEMPTS):
    steps = [s for s in committed_steps(run) if below is None or s < below]
    if not steps:
      raise error or checkpoint.CheckpointError(f"no checkpoint in {run.path}/checkpoints.")
    step, error = steps[-1], None
    try:
      if sampler is None:
        run_config = run.config.copy_and_resolve_references()
        run_config.sample = config.sample
        sampler = sampling.CheckpointSampler(run_config, run.path, step)
      else:
        sampler.load(step)
    except checkpoint.CheckpointError as e:
      error = e
    if not multihost.any_process(error is not None):
      return sampler
    error = error or checkpoint.CheckpointError(
        f"checkpoint {step} of {run.path} could not be read on another process.")
    if step in committed_steps(run):
      logging.warning("Sweep: %s step %d cannot be restored (%s); reading the step before "
                      "it instead.", run.name, step, str(error).split(" If the files")[0])
      below = step
    else:
      logging.info("Sweep: %s step %d was deleted by training before it was read; "
                   "taking the newest step instead.", run.name, step)
  raise error


def _evaluate_cell(run: Run, sampler: sampling.CheckpointSampler, w: float,
                   config: ml_collections.ConfigDict, evaluator: evaluator_lib.Evaluator,
                   out_dir: str, progress: Progress,
                   stop: preemption.StopAgreement | None = None) -> dict:
  """Samples sweep.num_samples images at ``w`` and scores them. Each process scores the
  images its own devices drew; the evaluator reduces the statistics across processes."""
  sw, run_config = config.sweep, sampler.config
  labels = sweep_labels(sw.num_samples, run_config.data.num_classes)
  accumulator = evaluator.accumulator()
  chunk = max(sampler.batch_size, (1000 // sampler.batch_size) * sampler.batch_size)
  grid_size = GRID_PER_CLASS * min(run_config.data.num_classes, GRID_CLASSES)
  grid = None
  for start in range(0, len(labels), chunk):
    part = labels[start:start + chunk]
    # Image i's noise is keyed by (seed, i) whatever the chunk: same seeds at every w.
    kwargs = dict(seed=config.seed, sampler=sw.sampler, num_steps=sw.num_steps,
                  first_index=start)
    if grid is None:  # the first chunk whole on every process, for the picture
      images = sampler.sample(part, w, **kwargs)
      grid = images[:grid_size]
      lo, hi = multihost.process_share(len(part))
      images, positions = images[lo:hi], np.arange(lo, hi)
    else:
      images, positions = sampler.sample_local(part, w, **kwargs)
    # Sample indices (= noise indices) let the evaluator refuse a sample counted twice.
    accumulator.update(images, part[positions], indices=start + positions)
    progress.advance(len(part))
    if stop is not None:
      stop.stop_here(f"{run.name} w={w:g} was not finished; the finished cells are in "
                     "results.csv")
  scores = accumulator.result()
  names = (list(sources.FASHION_MNIST_CLASSES) if run_config.data.name == "fashion_mnist"
           else None)
  row = dict(run=run.name, step=sampler.step, p_uncond=run_config.diffusion.p_uncond, w=w,
             **settings(config), **scores.values)
  if jax.process_index() == 0:
    png, _ = sampling.write_samples(out_dir, w, grid, labels[:len(grid)], names,
                                    stem=f"{run.name}_w{w}")
    logging.info("Wrote %s", png)
    if scores.replicates:
      _write_replicates(replicates_path(out_dir, row), scores.replicates)
  return row


def _floor(config: ml_collections.ConfigDict, runs: list[Run], out_dir,
           evaluator: evaluator_lib.Evaluator | None) -> dict:
  """The real-image floor of this sweep's settings: from the evaluator when this sweep
  built one (and then saved), else from WORKDIR/sweep/floor.json, so a sweep with nothing
  left to do does not score num_samples real images again just to print the table."""
  path = out_dir / "floor.json"
  key = "|".join(f"{k}={settings(config)[k]}" for k in ("num_samples", "feature_net",
                                                          "metrics", "score_splits",
                                                          "bootstrap"))
  saved = multihost.agreed(json.loads(path.read_text()) if path.exists() else {})
  if evaluator is None and key in saved:
    return saved[key]
  evaluator = evaluator or evaluator_lib.make_evaluator(config, runs[0].config, out_dir)
  floor = {k: v if isinstance(v, str) else float(v) for k, v in evaluator.floor.items()}
  if jax.process_index() == 0:
    files.write_atomic(path, json.dumps(saved | {key: floor}, indent=2))
  return floor


def _missing_weights(run: Run, step: int | None, done: set,
                     config: ml_collections.ConfigDict) -> list[float]:
  """The weights of config.sweep.guidance_weights not yet in results.csv at ``step``."""
  if step is None:
    return []
  key = tuple(_canonical(v) for v in settings(config).values())
  return [float(w) for w in config.sweep.guidance_weights
          if (run.name, step, float(w)) + key not in done]


def _lock_text(run: Run) -> str:
  try:
    return (files.path(run.path) / workdir_lock.LOCK_FILE).read_text()
  except OSError:  # absent (no job) or unreadable now: no sign of life either way
    return ""


class _Liveness:
  """Whether an unfinished run's training still lives, judged by what this sweep sees
  change (its newest step, its lock's heartbeat) on this host's clock: nothing changed
  for sweep.dead_run_seconds means its training has stopped."""

  def __init__(self, dead_seconds: float):
    self.dead_seconds = dead_seconds
    self._seen: dict[str, tuple[tuple, float]] = {}

  def dead(self, run: Run, newest: int | None) -> bool:
    """True (on every process: process 0 decides) when ``run`` has stopped changing."""
    now = time.monotonic()
    if jax.process_index() == 0:
      state = (newest, _lock_text(run))
      seen, since = self._seen.get(run.name, (None, now))
      if seen != state:
        since = now
      self._seen[run.name] = (state, since)
      verdict = now - since > self.dead_seconds
    else:
      verdict = False
    return multihost.agreed(verdict)


def _sleep(seconds: float, stop: preemption.StopAgreement) -> None:
  """Sleeps in steps of at most 10 s, stopping at a SIGTERM (every process takes the
  same number of steps, so their stop checks pair up)."""
  steps = max(1, math.ceil(seconds / 10))
  for _ in range(steps):
    time.sleep(seconds / steps)
    stop.stop_here("nothing was being evaluated")


def run(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Evaluates every missing (run, newest step, w) cell; returns the written files.

  With sweep.poll_seconds > 0 it keeps polling until every run's final step
  (train.num_steps) is evaluated: an evaluation job beside live training jobs. A run
  whose training diverged (WORKDIR/diverged.json) is not evaluated; a run whose training
  stopped unfinished (`_Liveness`) ends the polling with a CheckpointError naming it,
  after the table is written. A SIGTERM stops it between chunks of samples
  (preemption.Preempted).
  """
  sw = config.sweep
  out_dir = files.path(workdir) / "sweep"
  results_csv = str(out_dir / "results.csv")
  evaluator = None
  samplers: dict[str, sampling.CheckpointSampler] = {}  # one per run, reloaded per step
  stop = preemption.StopAgreement()
  liveness = _Liveness(sw.dead_run_seconds)
  stopped: dict[str, str] = {}  # unfinished runs whose training has stopped
  while True:
    runs = find_runs(workdir)
    if not runs and not sw.poll_seconds:
      raise checkpoint.CheckpointError(
          f"no training run under {workdir}: a run is a directory with checkpoints/ and "
          "config.json, written by --mode=train.")
    rows = multihost.agreed(read_results(results_csv))
    done = {_cell_key(r) for r in rows if r.get("fid") not in (None, "")}
    finished = bool(runs)
    for r in runs:
      if multihost.agreed((files.path(r.path) / train.DIVERGED_FILE).exists()
                          if jax.process_index() == 0 else None):
        if r.name not in stopped:
          logging.warning("Sweep: skipping %s: its training diverged (%s).", r.name,
                          files.path(r.path) / train.DIVERGED_FILE)
        stopped[r.name] = "diverged"
        continue
      # Steps are listed now and restored at once: training deletes old ones meanwhile.
      newest = latest_step(r)
      if not _missing_weights(r, newest, done, config):
        complete = newest == r.config.train.num_steps
        if not complete and sw.poll_seconds and liveness.dead(r, newest):
          stopped[r.name] = (f"its training stopped at step {newest} of "
                             f"{r.config.train.num_steps}")
          continue
        finished &= complete
        continue
      sampler = samplers[r.name] = restore_newest(r, config, samplers.get(r.name))
      todo = _missing_weights(r, sampler.step, done, config)
      finished &= sampler.step == r.config.train.num_steps
      evaluator = evaluator or evaluator_lib.make_evaluator(config, runs[0].config, out_dir)
      progress = Progress("Sweep", len(todo) * sw.num_samples)
      logging.info("Sweep: %s step %d: %d cells to evaluate (%d already done), %d samples "
                   "each.", r.name, sampler.step, len(todo), len(rows), sw.num_samples)
      for w in todo:
        row = _evaluate_cell(r, sampler, w, config, evaluator, out_dir, progress, stop)
        logging.info("%s step %d w=%g: %s", r.name, sampler.step, w,
                     {k: round(row[k], 4) for k in evaluator_lib.METRICS})
        rows.append(_as_written(row | {"fid_floor": evaluator.floor["fid"]}))
        done.add(_cell_key(rows[-1]))
        if jax.process_index() == 0:
          _write_results(results_csv, rows)
    # Each host read its own config.json (num_steps); stop on process 0's word.
    if not sw.poll_seconds or multihost.agreed(finished):
      break
    logging.info("Sweep: waiting %d s for new checkpoints.", sw.poll_seconds)
    _sleep(sw.poll_seconds, stop)

  if evaluator is None and not rows and stopped:
    why_stopped = {name: "its training diverged (see its diverged.json)" if why == "diverged"
                   else why for name, why in stopped.items()}
    raise checkpoint.CheckpointError(
        f"nothing to evaluate under {workdir}: " + "; ".join(
            f"{name}: {why}" for name, why in why_stopped.items())
        + ". Resume or retrain those runs first.")
  floor = _floor(config, runs, out_dir, evaluator)
  paths = [str(out_dir / name) for name in ("results.md", "tradeoff.png")]
  if jax.process_index() == 0:
    # Rows scored by an older definition of the metrics stay in results.csv but are not
    # tabulated: the floor and the reference they were scored against are gone.
    rows = [r for r in rows if _canonical(str(r.get("metrics") or "")) ==
            _canonical(METRICS_VERSION)]
    replicates = {}
    for row in rows:
      found = read_replicates(replicates_path(out_dir, row))
      if found is not None:
        replicates[_cell_key(row)] = found
    table = results_markdown(rows, floor, replicates)
    files.write_atomic(paths[0], table)
    current = tuple(_canonical(v) for v in settings(config).values())
    plot_tradeoff([r for r in rows if _setting_key(r) == current], paths[1])
    print(table)
  unfinished = {name: why for name, why in stopped.items() if why != "diverged"}
  if unfinished:
    raise checkpoint.CheckpointError(
        "the sweep stopped polling: " + "; ".join(
            f"{name}: {why} (no new checkpoint and no lock heartbeat for "
            f"{sw.dead_run_seconds:.0f} s)" for name, why in unfinished.items())
        + f". Its table so far is in {paths[0]}; restart that training, then the sweep.")
  grids = [out_dir / f"{r.name}_w{float(w)}.png" for r in runs for w in sw.guidance_weights]
  return [results_csv] + paths + [str(g) for g in grids if g.exists()]
