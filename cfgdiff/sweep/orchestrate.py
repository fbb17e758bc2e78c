"""--mode=sweep's loop: find the runs, restore each one's newest checkpoint, sample and
score the missing cells, append them to the results store, and write the report; with
sweep.poll_seconds > 0, beside live training jobs, until every run's final step is done.
"""

from __future__ import annotations

import dataclasses
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
  guide_networks,
  multihost,
  preemption,
  sampling,
  sources,
  train,
  workdir_lock,
)
from cfgdiff.evaluation import evaluator as evaluator_lib
from cfgdiff.evaluation import references
from cfgdiff.progress import Progress
from cfgdiff.sweep import report, store

# How many times a sweep re-reads the newest step when the one it chose was deleted by
# the training job (keep_checkpoints) before it could be restored.
RESTORE_ATTEMPTS = 5

GRID_PER_CLASS = 8

GRID_CLASSES = 10  # the sample grid shows the first classes only (ImageNet has 1000)



class SweepError(RuntimeError):
  """Nothing under the workdir can be evaluated, or the runs it waits for have stopped."""


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
        sampler = sampling.CheckpointSampler(run_config(run, config), run.path, step)
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



def run_config(run: Run, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The run's own config, sampled with this sweep's config.sample options."""
  resolved = run.config.copy_and_resolve_references()
  resolved.sample = config.sample
  return resolved



def method_settings(run: Run, step: int | None,
                    config: ml_collections.ConfigDict) -> dict[str, dict[str, str]]:
  """Each of sweep.methods' settings (`store.settings`) at checkpoint ``step`` of ``run``,
  the network guiding it checked and named. Autoguidance by an earlier checkpoint of the
  run itself is left out at steps not after sample.weak_step."""
  sc, found = config.sample, {}
  for method in config.sweep.methods:
    if method == "auto" and not sc.weak_workdir and step is not None and step <= sc.weak_step:
      continue
    helper = guide_networks.resolve_guide_helper(run_config(run, config), run.path, method, step)
    found[method] = store.settings(config, method, helper.describe() if helper else "")
  return found



def _evaluate_cell(run: Run, sampler: sampling.CheckpointSampler, method: str, w: float,
                   config: ml_collections.ConfigDict, settings: dict[str, str],
                   evaluator: evaluator_lib.Evaluator, out_dir: str, progress: Progress,
                   stop: preemption.StopAgreement | None = None) -> dict:
  """Samples sweep.num_samples images guided by ``method`` at weight ``w`` and scores
  them. Each process scores the images its own devices drew; the evaluator reduces the
  statistics across processes. ``settings``: the cell's `store.settings`."""
  sw, run_config = config.sweep, sampler.config
  labels = sweep_labels(sw.num_samples, run_config.data.num_classes)
  accumulator = evaluator.accumulator()
  chunk = max(sampler.batch_size, (1000 // sampler.batch_size) * sampler.batch_size)
  grid_size = GRID_PER_CLASS * min(run_config.data.num_classes, GRID_CLASSES)
  grid, sampling_seconds = None, 0.0
  for start in range(0, len(labels), chunk):
    part = labels[start:start + chunk]
    # Image i's noise is keyed by (seed, i) whatever the chunk: same seeds at every w.
    kwargs = dict(seed=config.seed, sampler=sw.sampler, num_steps=sw.num_steps,
                  first_index=start, guidance_method=method)
    began = time.perf_counter()
    if grid is None:  # the first chunk whole on every process, for the picture
      images = sampler.sample(part, w, **kwargs)
      grid = images[:grid_size]
      lo, hi = multihost.process_share(len(part))
      images, positions = images[lo:hi], np.arange(lo, hi)
    else:
      images, positions = sampler.sample_local(part, w, **kwargs)
    sampling_seconds += time.perf_counter() - began
    # Sample indices (= noise indices) let the evaluator refuse a sample counted twice.
    accumulator.update(images, part[positions], indices=start + positions)
    progress.advance(len(part))
    if stop is not None:
      stop.stop_here(f"{run.name} w={w:g} was not finished; the finished cells are in "
                     "results.csv")
  scores = accumulator.result()
  names = (list(sources.FASHION_MNIST_CLASSES) if run_config.data.name == "fashion_mnist"
           else None)
  cost = sampler.guide_cost(method, sw.sampler, sw.num_steps)
  row = dict(run=run.name, step=sampler.step, p_uncond=run_config.diffusion.p_uncond, w=w,
             **settings, **scores.values, nfe_per_sample=cost[0], backward_per_sample=cost[1],
             seconds_per_sample=f"{sampling_seconds / len(labels):.4g}")
  if jax.process_index() == 0:
    png, _ = sampling.write_samples(out_dir, w, grid, labels[:len(grid)], names,
                                    stem=grid_stem(run.name, method, w))
    logging.info("Wrote %s", png)
    if scores.replicates:
      store.write_replicates(store.replicates_path(out_dir, row), scores.replicates)
  return row



def grid_stem(run_name: str, method: str, w: float) -> str:
  """WORKDIR/sweep/{stem}.png: {run}_w{w} for classifier-free guidance, else
  {run}_{method}_w{w}."""
  return f"{run_name}_w{float(w)}" if method == "cfg" else f"{run_name}_{method}_w{float(w)}"



def _floor(config: ml_collections.ConfigDict, runs: list[Run], out_dir,
           evaluator: evaluator_lib.Evaluator | None) -> dict:
  """The real-image floor of this sweep's settings: from the evaluator when this sweep
  built one (and then saved), else from WORKDIR/sweep/floor.json, so a sweep with nothing
  left to do does not score num_samples real images again just to print the table."""
  path = out_dir / "floor.json"
  key = "|".join(f"{k}={store.settings(config)[k]}" for k in ("num_samples", "feature_net",
                                                          "metrics", "score_splits",
                                                          "bootstrap"))
  saved = multihost.agreed(json.loads(path.read_text()) if path.exists() else {})
  if evaluator is None and key in saved:
    return saved[key]
  evaluator = evaluator or references.make_evaluator(config, runs[0].config, out_dir)
  floor = {k: v if isinstance(v, str) else float(v) for k, v in evaluator.floor.items()}
  if jax.process_index() == 0:
    files.write_atomic(path, json.dumps(saved | {key: floor}, indent=2))
  return floor



def missing_cells(run: Run, step: int | None, done: set, config: ml_collections.ConfigDict
                  ) -> list[tuple[str, float, dict[str, str]]]:
  """(method, w, settings) of each cell of sweep.methods x its weight grid not yet in
  results.csv at ``step``."""
  if step is None:
    return []
  cells = []
  for method, settings in method_settings(run, step, config).items():
    key = store.setting_key(settings)
    cells += [(method, w, settings) for w in configs.method_weights(config.sweep, method)
              if (run.name, step, w) + key not in done]
  return cells



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
  stopped unfinished (`_Liveness`) ends the polling with a SweepError naming it,
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
  if not sw.poll_seconds:  # every guiding network checked before anything compiles
    for r in find_runs(workdir):
      method_settings(r, None, config)
  while True:
    runs = find_runs(workdir)
    if not runs and not sw.poll_seconds:
      raise SweepError(
          f"no training run under {workdir}: a run is a directory with checkpoints/ and "
          "config.json, written by --mode=train.")
    rows = multihost.agreed(store.read_results(results_csv))
    done = {store.cell_key(r) for r in rows if r.get("fid") not in (None, "")}
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
      if not missing_cells(r, newest, done, config):
        complete = newest == r.config.train.num_steps
        if not complete and sw.poll_seconds and liveness.dead(r, newest):
          stopped[r.name] = (f"its training stopped at step {newest} of "
                             f"{r.config.train.num_steps}")
          continue
        finished &= complete
        continue
      sampler = samplers[r.name] = restore_newest(r, config, samplers.get(r.name))
      todo = missing_cells(r, sampler.step, done, config)
      finished &= sampler.step == r.config.train.num_steps
      evaluator = evaluator or references.make_evaluator(config, runs[0].config, out_dir)
      progress = Progress("Sweep", len(todo) * sw.num_samples)
      logging.info("Sweep: %s step %d: %d cells to evaluate (%d already done), %d samples "
                   "each.", r.name, sampler.step, len(todo), len(rows), sw.num_samples)
      for method, w, settings in todo:
        row = _evaluate_cell(r, sampler, method, w, config, settings, evaluator, out_dir,
                             progress, stop)
        logging.info("%s step %d %s w=%g: %s", r.name, sampler.step, method, w,
                     {k: round(row[k], 4) for k in evaluator_lib.METRICS})
        rows.append(store.as_written(row | {"fid_floor": evaluator.floor["fid"]}))
        done.add(store.cell_key(rows[-1]))
        if jax.process_index() == 0:
          store.write_results(results_csv, rows)
    # Each host read its own config.json (num_steps); stop on process 0's word.
    if not sw.poll_seconds or multihost.agreed(finished):
      break
    logging.info("Sweep: waiting %d s for new checkpoints.", sw.poll_seconds)
    _sleep(sw.poll_seconds, stop)

  if evaluator is None and not rows and stopped:
    why_stopped = {name: "its training diverged (see its diverged.json)" if why == "diverged"
                   else why for name, why in stopped.items()}
    raise SweepError(
        f"nothing to evaluate under {workdir}: " + "; ".join(
            f"{name}: {why}" for name, why in why_stopped.items())
        + ". Resume or retrain those runs first.")
  floor = _floor(config, runs, out_dir, evaluator)
  paths = [str(out_dir / name) for name in ("results.md", "tradeoff.png")]
  if jax.process_index() == 0:
    # Rows scored by an older definition of the metrics stay in results.csv but are not
    # tabulated: the floor and the reference they were scored against are gone.
    rows = [r for r in rows if store.canonical(str(r.get("metrics") or "")) ==
            store.canonical(store.METRICS_VERSION)]
    replicates = {}
    for row in rows:
      found = store.read_replicates(store.replicates_path(out_dir, row))
      if found is not None:
        replicates[store.cell_key(row)] = found
    table = report.results_markdown(rows, floor, replicates)
    files.write_atomic(paths[0], table)
    report.plot_tradeoff(report.current_rows(rows, store.settings(config)), paths[1])
    print(table)
  unfinished = {name: why for name, why in stopped.items() if why != "diverged"}
  if unfinished:
    raise SweepError(
        "the sweep stopped polling: " + "; ".join(
            f"{name}: {why} (no new checkpoint and no lock heartbeat for "
            f"{sw.dead_run_seconds:.0f} s)" for name, why in unfinished.items())
        + f". Its table so far is in {paths[0]}; restart that training, then the sweep.")
  grids = [out_dir / f"{grid_stem(r.name, m, w)}.png" for r in runs for m in sw.methods
           for w in configs.method_weights(sw, m)]
  return [results_csv] + paths + [str(g) for g in grids if g.exists()]
