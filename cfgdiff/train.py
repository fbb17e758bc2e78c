"""The training loop: resume or start, step, log, checkpoint, and stop cleanly.

What a run is made of (model, optimizer, mesh, TrainState) is built by `cfgdiff.build`, its
step by `cfgdiff.train_step` with the kernel gradient `cfgdiff.kernel_choice` picks, its
batches by `cfgdiff.sources`. The loop holds WORKDIR/train.lock (`cfgdiff.workdir_lock`),
checkpoints, and stops cleanly on SIGTERM (`cfgdiff.preemption`), a hung peer
(`cfgdiff.watchdog`) or divergence.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from cfgdiff import (
  build,
  checkpoint,
  configs,
  data,
  files,
  kernel_choice,
  multihost,
  preemption,
  resume,
  sources,
  watchdog,
  workdir_lock,
)

Array = jnp.ndarray
PyTree = Any


def train(config: ml_collections.ConfigDict, workdir: str,
          allow_config_change: bool = False) -> build.TrainState:
  """Trains (or resumes) to config.train.num_steps, checkpointing into WORKDIR/checkpoints.

  Returns the final state; its step is below config.train.num_steps when the job was
  preempted (SIGTERM) and saved early. Refuses, writing nothing, a workdir that another
  live training job holds (`workdir_lock.lock_for_training`), and a resume that would
  change the run's trajectory or data (`cfgdiff.resume`) unless ``allow_config_change``. Raises
  workdir_lock.LockLostError when another job takes the workdir over, and DivergedError
  after train.max_nonfinite_steps non-finite updates in a row.
  """
  lock = workdir_lock.lock_for_training(workdir, config.runtime.workdir_lease_seconds)
  try:
    return _train(config, workdir, lock, allow_config_change)
  finally:
    if lock is not None:
      lock.release()


class DivergedError(RuntimeError):
  """Too many non-finite updates in a row: the run has diverged."""


DIVERGED_FILE = "diverged.json"  # in the workdir: the sweep skips such a run


def _restore_or_create(config, workdir, model, optimizer, mesh, ckpt):
  """The newest restorable checkpoint's state (damaged newer steps moved aside), or a
  fresh state."""
  if ckpt.latest_step() is None:
    return build.create_state(config, model, optimizer, mesh)
  state, position, step = ckpt.restore_newest_good(
      build.abstract_state(config, model, optimizer, mesh))
  # The input pipeline's saved state is its next step, which must be the train step's.
  if position["next_step"] != int(state.step):
    raise checkpoint.CheckpointError(
        f"checkpoint {step} is inconsistent: data position {position['next_step']} != "
        f"train step {int(state.step)}.")
  logging.info("Resumed from %s at step %d.", ckpt.directory, int(state.step))
  return state


def _train(config: ml_collections.ConfigDict, workdir: str,
           lock: workdir_lock.WorkdirLock | None, allow_config_change: bool
           ) -> build.TrainState:
  # clu's writers import TensorFlow: imported here so the library's math never loads it,
  # and installed only with the train extra (sampling and evaluation need none of it).
  try:
    from clu import metric_writers, periodic_actions
  except ImportError as e:
    raise configs.ConfigError(
        f"training writes its metrics with clu and TensorBoard, which are not installed "
        f"({e}): run `pip install -e '.[train]'` (make setup does).") from e

  tc = config.train
  saved = checkpoint.saved_steps(workdir)
  resume.check_config(config, workdir, saved[-1] if saved else 0, allow_config_change)
  source = sources.training_source(config)  # bad data is refused before anything compiles
  resume.check_data(source.fingerprint(), workdir, saved[-1] if saved else 0,
                    allow_config_change)
  del source
  if (files.path(workdir) / DIVERGED_FILE).exists() and jax.process_index() == 0:
    (files.path(workdir) / DIVERGED_FILE).unlink()  # a new attempt (e.g. a lower rate)
  mesh = build.make_mesh(tuple(config.runtime.mesh_shape))
  model, optimizer = build.make_model(config), build.make_optimizer(tc)
  ckpt = checkpoint.Checkpointer(workdir, keep=tc.keep_checkpoints)
  state = _restore_or_create(config, workdir, model, optimizer, mesh, ckpt)
  start = int(state.step)

  step_fn = kernel_choice.compile_train_step(config, model, optimizer, mesh, state, workdir)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start == 0:
    writer.write_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v)
                          for k, v in configs.flatten(config)})
  report = periodic_actions.ReportProgress(num_train_steps=tc.num_steps, writer=writer)
  logging.info("Training %d steps from step %d on %d device(s), mesh data %d x fsdp %d; "
               "batch %d.", tc.num_steps, start, jax.device_count(), mesh.shape["data"],
               mesh.shape["fsdp"], tc.batch_size)

  guard = _Guards(config, workdir, lock)
  try:
    with sources.training_pipeline(config, start) as pipeline:
      state = _loop(config, state, step_fn, pipeline, mesh, ckpt, writer, report, guard)
  except BaseException:
    _finish_saving(ckpt, guard, already_failing=True)
    raise
  _finish_saving(ckpt, guard)
  writer.flush()
  return state


def _finish_saving(ckpt: checkpoint.Checkpointer, guard: _Guards,
                   already_failing: bool = False) -> None:
  """Lets a save in flight commit (or fail) before the job ends; the watchdog still
  watches that wait. A save error is raised, unless the job is already failing."""
  try:
    ckpt.wait()
  except checkpoint.CheckpointError as e:
    if not already_failing:
      raise
    logging.error("%s", e)
  finally:
    guard.watchdog.stop()
    ckpt.close()


class _Guards:
  """What the loop checks besides training: SIGTERM, the lock, divergence, the watchdog."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               lock: workdir_lock.WorkdirLock | None):
    self.config, self.workdir, self.lock = config, workdir, lock
    self.preemption = preemption.StopAgreement()
    self.watchdog = watchdog.StepWatchdog(
        config.runtime.step_timeout_seconds or float("inf"), jax.process_index(),
        jax.process_count(), on_stall=lock.release if lock is not None else None)
    self._unchecked: list[tuple[int, Array]] = []  # (step, finite flag) not yet read
    self._nonfinite_run = 0  # non-finite updates in a row, up to the last checked step
    self._last_finite = -1

  def check_lock(self, done: int, saving: bool) -> None:
    """Raises LockLostError, on every process, when another job took the workdir."""
    if jax.process_count() == 1:
      lost = self.lock is not None and (self.lock.lost or (saving and not self.lock.held()))
    elif saving or done % self.config.train.log_every_steps == 0:  # a collective: seldom
      lost = multihost.any_process(self.lock is not None and not self.lock.held())
    else:
      return
    if lost:
      raise (self.lock.lost_error() if self.lock is not None else workdir_lock.LockLostError(
          "process 0's workdir lock was taken over by another job; stopped without saving."))

  def add_finite(self, step: int, finite: Array) -> None:
    self._unchecked.append((step, finite))

  def check_divergence(self) -> None:
    """Reads the finite flags of the steps since the last check; raises DivergedError at
    train.max_nonfinite_steps non-finite updates in a row (writing WORKDIR/diverged.json)."""
    limit = self.config.train.max_nonfinite_steps
    flags = jax.device_get([f for _, f in self._unchecked])
    for (step, _), finite in zip(self._unchecked, flags, strict=True):
      if finite:
        self._nonfinite_run, self._last_finite = 0, step
        continue
      self._nonfinite_run += 1
      if limit and self._nonfinite_run >= limit:
        self._unchecked = []
        message = (f"training diverged: {self._nonfinite_run} non-finite updates in a row "
                   f"(train.max_nonfinite_steps={limit}), the last at step {step}; every one "
                   "was skipped, so the checkpoints hold the last finite parameters. Lower "
                   "train.learning_rate (or raise train.grad_clip's strictness) and resume, "
                   "or start again in a new --workdir.")
        if jax.process_index() == 0:
          files.write_atomic(files.path(self.workdir) / DIVERGED_FILE, json.dumps(
              {"step": step, "nonfinite_in_a_row": self._nonfinite_run,
               "last_finite_step": self._last_finite}))
        raise DivergedError(message)
    self._unchecked = []


# Steps dispatched ahead of the devices on CPU. A workaround, to revisit with jaxlib > 0.10.2:
# unbounded, its CPU client deadlocked about 150 steps into the Fashion-MNIST main job (2
# devices): one device waited in the gradient all-reduce for a step the other was never
# given, while the dispatching thread waited for a free slot. Two keep the devices fed;
# the wait is on a few scalars. TPU and GPU dispatch unboundedly, as before.
_MAX_CPU_STEPS_IN_FLIGHT = 2


def _loop(config: ml_collections.ConfigDict, state: build.TrainState, step_fn: Callable,
          pipeline: data.Pipeline, mesh: Mesh, ckpt: checkpoint.Checkpointer, writer,
          report: Callable[[int], None], guard: _Guards) -> build.TrainState:
  """Steps from ``state.step`` to train.num_steps, or to the step a SIGTERM stops at;
  logs through ``writer`` (a clu metric writer) and saves the pipeline's state with
  every checkpoint. Stops, saving nothing more, when the lock is lost or the run diverges.
  """
  tc = config.train
  window: list[dict[str, Array]] = []
  in_flight: collections.deque[dict[str, Array]] = collections.deque()
  max_in_flight = _MAX_CPU_STEPS_IN_FLIGHT if jax.default_backend() == "cpu" else None
  window_start = time.time()
  start = int(state.step)
  for step in range(start, tc.num_steps):
    state, metrics = step_fn(state, build.global_batch(next(pipeline), mesh))
    done = step + 1
    if step == start:  # armed once the first step (which compiles) has run
      jax.block_until_ready(metrics)
      guard.watchdog.start(done)
    guard.watchdog.beat(done)
    window.append(metrics)
    guard.add_finite(done, metrics["finite"])
    if max_in_flight is not None:
      in_flight.append(metrics)
      if len(in_flight) > max_in_flight:
        jax.block_until_ready(in_flight.popleft())
    report(done)
    saving = done % tc.checkpoint_every_steps == 0 or done == tc.num_steps
    if done % tc.log_every_steps == 0 or done == tc.num_steps:
      summary = summarize(jax.device_get(window))
      summary["images_per_second"] = len(window) * tc.batch_size / (time.time() - window_start)
      summary["skipped_updates_total"] = int(state.num_skipped)
      writer.write_scalars(done, summary)
      window, window_start = [], time.time()
      ckpt.check_for_errors()
    preempted = guard.preemption.should_stop(done)
    guard.check_lock(done, saving or preempted)
    if saving or preempted or done % tc.log_every_steps == 0:
      guard.check_divergence()
    if saving or preempted:
      ckpt.save(done, state, pipeline.get_state())
    if preempted:
      logging.warning("Preempted (SIGTERM) at step %d: checkpoint saved; run the same "
                      "command again to continue.", done)
      break
  return state


def summarize(window: list[dict[str, np.ndarray]]) -> dict[str, float]:
  """Averages step metrics over a logging window; loss over finite steps only."""
  finite = np.array([m["finite"] for m in window])
  losses = np.array([m["loss"] for m in window])
  return {"loss": float(losses.sum() / max(finite.sum(), 1.0)),
          "grad_norm": float(np.mean([m["grad_norm"] for m in window])),
          "skipped_updates": float(len(window) - finite.sum())}
