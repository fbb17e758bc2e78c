"""Joint conditional/unconditional training: the sharded train step and the loop.

What a run is made of (model, optimizer, mesh, TrainState) is built by `cfgdiff.build`.
The train step is jitted once over the (data, fsdp) mesh: the batch is split over every
device. All random numbers are drawn for the global batch inside the step, so the result
does not depend on the device count. The loop holds WORKDIR/train.lock, checkpoints, and
stops cleanly on SIGTERM.
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
import optax
from absl import logging
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cfgdiff import (
  build,
  checkpoint,
  configs,
  data,
  diffusion,
  files,
  multihost,
  preemption,
  resume,
  sources,
  watchdog,
  workdir_lock,
)
from cfgdiff.models import UNet
from cfgdiff.models import classifier as classifier_net

Array = jnp.ndarray
PyTree = Any


def _flat_allreduce_is_exact(config: ml_collections.ConfigDict, mesh: Mesh) -> bool:
  """Parameters replicated (no 'fsdp' split) and no dropout: there the flat step computes
  what the SPMD step computes."""
  return mesh.shape["fsdp"] == 1 and config.model.dropout == 0.0


def flat_allreduce_applies(config: ml_collections.ConfigDict, mesh: Mesh) -> bool:
  """Whether the train step averages the devices' gradients as one flat vector (see
  `make_train_step`): on CPU meshes of several devices, where that is exact."""
  on_cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
  return on_cpu and mesh.size > 1 and _flat_allreduce_is_exact(config, mesh)


def make_train_step(config: ml_collections.ConfigDict, model: UNet,
                    optimizer: optax.GradientTransformation, mesh: Mesh,
                    flat_allreduce: bool | None = None, scan_microbatches: bool | None = None,
                    ) -> Callable[[build.TrainState, dict[str, Array]], tuple]:
  """Builds train_step(state, batch) -> (state, metrics) (not yet jitted).

  ``batch`` holds 'image' float32 [B,H,W,C] in [-1, 1] and 'label' int32 [B].
  With train.microbatch_size > 0 the gradient is accumulated over micro-batches: the
  same gradient up to rounding in less memory (on one CPU device it was also 1.4x
  faster; with one device per core it was not, see BENCHMARKS.md). With
  ``scan_microbatches`` (default: off CPU) they run in a `lax.scan`, which holds one
  micro-batch's activations at a time; unrolled, XLA may schedule every forward pass first
  (on CPU, 4 micro-batches of 8 kept 95% of the whole batch's temporary memory), but
  XLA:CPU runs convolutions in a loop body about 30x slower (BENCHMARKS.md).

  With ``flat_allreduce`` (default: `flat_allreduce_applies`) each device computes the
  gradient of its part of the batch (`jax.shard_map`) and the devices average all of it
  in one all-reduce of one flat vector. Otherwise XLA's SPMD partitioner reduces each
  gradient array, in one all-reduce of a tuple of ~200 arrays that XLA:CPU runs array by
  array: 1.05-1.10x slower on the Fashion-MNIST step on 2 devices, 2.1-2.3x across 2
  processes (BENCHMARKS.md). It needs replicated parameters, and no dropout: the SPMD
  step draws the dropout masks for the global batch, which a device's part cannot.
  """
  dc, tc = config.diffusion, config.train
  num_micro = tc.batch_size // tc.microbatch_size if tc.microbatch_size else 1
  micro_sharding = NamedSharding(mesh, P(None, build.MESH_AXES))
  if flat_allreduce is None:
    flat_allreduce = flat_allreduce_applies(config, mesh)
  elif flat_allreduce and not _flat_allreduce_is_exact(config, mesh):
    raise ValueError("The flat gradient all-reduce needs replicated parameters "
                     f"(mesh fsdp=1, not {mesh.shape['fsdp']}) and "
                     f"config.model.dropout=0 (not {config.model.dropout}).")
  if scan_microbatches is None:
    scan_microbatches = any(d.platform != "cpu" for d in mesh.devices.flat)

  # The noisy classifier (--mode=train_classifier) learns p(c | z_l) by cross-entropy on
  # the same z_l as the denoiser, every label kept.
  classifier = config.model.kind == "noisy_classifier"

  def loss_and_grad(params, noised, dropout_rng):
    def loss_fn(p):
      rngs = {"dropout": dropout_rng}
      if classifier:
        logits = model.apply({"params": p}, noised["z"], noised["logsnr"], train=True,
                             rngs=rngs)
        return classifier_net.cross_entropy(logits, noised["label"])
      eps_pred = model.apply({"params": p}, noised["z"], noised["logsnr"], noised["label"],
                             train=True, rngs=rngs)
      return diffusion.eps_loss(eps_pred, noised["eps"])
    return jax.value_and_grad(loss_fn)(params)

  def accumulated_loss_and_grad(params, noised, dropout_rng, in_shard_map=False):
    if num_micro == 1:
      return loss_and_grad(params, noised, dropout_rng)
    split = jax.tree.map(lambda a: a.reshape((num_micro, -1) + a.shape[1:]), noised)
    if not in_shard_map:  # keep every micro-batch split over the devices
      split = jax.lax.with_sharding_constraint(split, micro_sharding)
    if scan_microbatches:
      def accumulate(total, micro_and_index):
        micro, index = micro_and_index
        out = loss_and_grad(params, micro, jax.random.fold_in(dropout_rng, index))
        return jax.tree.map(jnp.add, total, out), None
      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      total, _ = jax.lax.scan(accumulate, zeros, (split, jnp.arange(num_micro)))
      loss, grads = total
      return jax.tree.map(lambda x: x / num_micro, (loss, grads))
    total = None
    for index in range(num_micro):
      micro = jax.tree.map(lambda a, i=index: a[i], split)
      out = loss_and_grad(params, micro, jax.random.fold_in(dropout_rng, index))
      total = out if total is None else jax.tree.map(jnp.add, total, out)
    loss, grads = total
    return jax.tree.map(lambda x: x / num_micro, (loss, grads))

  def flat_reduced_loss_and_grad(params, noised, dropout_rng):
    def per_device(params, noised):  # this device's part of the batch
      loss, grads = accumulated_loss_and_grad(params, noised, dropout_rng, in_shard_map=True)
      flat, unravel = ravel_pytree(grads)
      # Equal parts, so the mean of the parts' means is the batch mean.
      loss, flat = jax.lax.pmean((loss, flat), build.MESH_AXES)
      return loss, unravel(flat)
    # check_vma=False: with it, shard_map would differentiate the replicated parameters
    # as such, summing their gradients over devices itself, array by array.
    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), build.BATCH),
                         out_specs=P(), check_vma=False)(params, noised)

  def train_step(state: build.TrainState, batch: dict[str, Array]):
    rng_noise, rng_dropout = jax.random.split(jax.random.fold_in(state.rng, state.step))
    noised = diffusion.noise_batch(
        rng_noise, batch["image"], batch["label"], p_uncond=0.0 if classifier else dc.p_uncond,
        num_classes=config.data.num_classes, logsnr_min=dc.logsnr_min, logsnr_max=dc.logsnr_max)
    grad_fn = flat_reduced_loss_and_grad if flat_allreduce else accumulated_loss_and_grad
    loss, grads = grad_fn(state.params, noised, rng_dropout)

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = jax.tree.map(lambda e, p: tc.ema_decay * e + (1.0 - tc.ema_decay) * p,
                              state.ema_params, params)
    # A non-finite update is dropped whole: parameters, EMA and optimizer moments.
    keep_if_finite = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep_if_finite(params, state.params),
        ema_params=keep_if_finite(ema_params, state.ema_params),
        opt_state=keep_if_finite(opt_state, state.opt_state),
        num_skipped=state.num_skipped + (~finite).astype(jnp.int32))
    metrics = {"loss": jnp.where(finite, loss, 0.0), "grad_norm": grad_norm,
               "finite": finite.astype(jnp.float32)}
    return new_state, metrics

  return train_step


def compile_train_step(config: ml_collections.ConfigDict, model: UNet,
                       optimizer: optax.GradientTransformation, mesh: Mesh,
                       flat_allreduce: bool | None = None,
                       scan_microbatches: bool | None = None) -> Callable:
  """`make_train_step` jitted with explicit shardings: the state as `build.state_shardings`,
  the batch split over every device, the state's buffers donated."""
  state = build.state_shardings(config, model, optimizer, mesh)
  return jax.jit(make_train_step(config, model, optimizer, mesh, flat_allreduce,
                                 scan_microbatches),
                 in_shardings=(state, NamedSharding(mesh, build.BATCH)),
                 out_shardings=(state, NamedSharding(mesh, P())), donate_argnums=0)


def make_source(config: ml_collections.ConfigDict) -> data.Source:
  """The training examples config.data names, checked against the config's shapes."""
  return sources.open_split(config.data, "train").source


def make_batcher(config: ml_collections.ConfigDict) -> data.Batcher:
  return data.Batcher(make_source(config), config.train.batch_size, config.seed,
                      jax.process_index(), jax.process_count(),
                      random_flip=config.data.random_flip,
                      random_crop=config.data.random_crop)


def make_pipeline(config: ml_collections.ConfigDict, start_step: int) -> data.Pipeline:
  """This process's batches from ``start_step`` on, made ahead by config.data.num_workers
  worker processes (the same batches for any number of workers or processes)."""
  return data.Pipeline(make_batcher(config), start_step, config.data.num_workers)


_KERNEL_GRADIENT_FILE = "kernel_gradient.json"
_TIMED = ("taps", "xla")  # the kernel gradients "auto" chooses between
_TIMED_STEPS = 5  # per variant and round; two rounds, alternating


def compile_train_step_for_backend(config: ml_collections.ConfigDict, model: UNet,
                                   optimizer: optax.GradientTransformation, mesh: Mesh,
                                   state: build.TrainState, workdir: str) -> Callable:
  """The train step, with the convolution kernel gradient train.kernel_gradient asks for.

  "auto" on CPU compiles the step with conv.py's tap products and with XLA's own kernel
  gradient, times two alternating rounds of _TIMED_STEPS steps of each on a copy of
  ``state`` and keeps the faster (which wins depends on the CPU: BENCHMARKS.md). Process
  0's timing decides for every process. On CPU the kernel gradient in use is written to
  WORKDIR/kernel_gradient.json, and "auto" reuses it on resume, so a resumed run computes
  what an uninterrupted one would (a checkpoint without the file, from before the file
  existed, keeps the taps those versions used). On TPU and GPU it is XLA's, untimed.
  """
  mode = config.train.kernel_gradient
  if jax.default_backend() != "cpu":
    mode = "xla"  # the taps exist on CPU only (conv.py)
  path = files.path(workdir) / _KERNEL_GRADIENT_FILE
  seconds, saved = None, None
  if mode == "auto":  # process 0 reads the saved choice for all
    saved = multihost.agreed(_saved_kernel_gradient(path) if jax.process_index() == 0 else None)
    mode = saved
    if mode == "auto" and int(state.step) > 0:
      mode = "taps"  # a checkpoint from a version without the file (or a finished run)
      logging.info("Kernel gradient: taps, which %s's checkpoint was trained with.", workdir)
    elif mode != "auto":
      logging.info("Kernel gradient: %s, as saved in %s.", mode, path)

  if mode == "auto":
    logging.info("Compiling the train step with each kernel gradient, to time both...")
    start = time.perf_counter()
    local = config.train.batch_size // jax.process_count()
    size, channels = config.data.image_size, config.data.channels
    batch = build.global_batch({"image": np.zeros((local, size, size, channels), np.float32),
                                "label": np.zeros(local, np.int32)}, mesh)
    steps = {name: compile_train_step(config, model.clone(kernel_grad_taps=name == "taps"),
                                      optimizer, mesh).lower(state, batch).compile()
             for name in _TIMED}
    seconds = multihost.agreed(_time_steps(steps, state, batch))
    mode = min(seconds, key=seconds.get)
    logging.info("Kernel gradient: %s (train step %.3f s with conv.py's tap products, %.3f s "
                 "with XLA's; compiled and timed in %.0f s).", mode, seconds["taps"],
                 seconds["xla"], time.perf_counter() - start)
    step_fn = steps[mode]
  else:
    step_fn = compile_train_step(config, model.clone(kernel_grad_taps=mode == "taps"),
                                 optimizer, mesh)
  if jax.default_backend() == "cpu" and mode != saved:
    _save_kernel_gradient(path, mode, seconds)
  return step_fn


def _time_steps(steps: dict[str, Callable], state: build.TrainState,
                batch: dict[str, Array]) -> dict[str, float]:
  """Best seconds per step of each compiled step, two alternating rounds on a copy of state."""
  scratch = jax.tree.map(jnp.copy, state)  # the steps donate (consume) their input state
  seconds = {name: float("inf") for name in steps}
  for _ in range(2):
    for name, step in steps.items():
      scratch, metrics = step(scratch, batch)  # warm-up
      jax.block_until_ready(metrics)
      tic = time.perf_counter()
      for _ in range(_TIMED_STEPS):
        scratch, metrics = step(scratch, batch)
      jax.block_until_ready(metrics)
      seconds[name] = min(seconds[name], (time.perf_counter() - tic) / _TIMED_STEPS)
  return seconds


def saved_kernel_gradient(workdir: str) -> str:
  """The kernel gradient WORKDIR's run trains with on CPU ("taps" or "xla"), as
  `compile_train_step_for_backend` saved it, or "auto" if none is saved."""
  return _saved_kernel_gradient(files.path(workdir) / _KERNEL_GRADIENT_FILE)


def _saved_kernel_gradient(path) -> str:
  """The kernel gradient saved in ``path``, or "auto" (time again) when there is none or
  it is unreadable: the file is a measurement, nothing else depends on it."""
  try:
    if not path.exists():
      return "auto"
    choice = json.loads(path.read_text())["kernel_gradient"]
    if choice in _TIMED:
      return choice
    error = f"kernel_gradient={choice!r}"
  except (OSError, ValueError, KeyError, TypeError) as e:
    error = f"{type(e).__name__}: {e}"
  logging.warning("Ignoring %s (%s); timing the kernel gradients again.", path, error)
  return "auto"


def _save_kernel_gradient(path, choice: str, seconds: dict[str, float] | None) -> None:
  """Process 0 records the kernel gradient in use; a failed write only costs a re-timing."""
  if jax.process_index() != 0:
    return
  try:
    files.write_atomic(path, json.dumps({"kernel_gradient": choice,
                                         "seconds_per_step": seconds}, indent=2))
  except OSError as error:
    logging.warning("Could not write %s (%s); a resumed run will time again.", path, error)


def lock_workdir(config: ml_collections.ConfigDict,
                 workdir: str) -> workdir_lock.WorkdirLock | None:
  """Process 0 takes WORKDIR/train.lock and every process learns whether it got it.

  Raises WorkdirBusyError on every process, before anything is written, when another
  live job holds the workdir. Returns the lock on process 0, None elsewhere.
  """
  lock, message = None, ""
  if jax.process_index() == 0:
    lock = workdir_lock.WorkdirLock(workdir, config.runtime.workdir_lease_seconds)
    try:
      lock.acquire()
    except Exception as e:  # every process must learn it failed, or the others wait
      lock, message = None, (str(e) if isinstance(e, workdir_lock.WorkdirBusyError) else
                             f"cannot take {workdir}/train.lock ({type(e).__name__}: {e}).")
  message = multihost.agreed(message)
  if message:
    raise workdir_lock.WorkdirBusyError(message)
  return lock


def train(config: ml_collections.ConfigDict, workdir: str,
          allow_config_change: bool = False) -> build.TrainState:
  """Trains (or resumes) to config.train.num_steps, checkpointing into WORKDIR/checkpoints.

  Returns the final state; its step is below config.train.num_steps when the job was
  preempted (SIGTERM) and saved early. Refuses, writing nothing, a workdir that another
  live training job holds (`lock_workdir`), and a resume that would change the run's
  trajectory or data (`cfgdiff.resume`) unless ``allow_config_change``. Raises
  workdir_lock.LockLostError when another job takes the workdir over, and DivergedError
  after train.max_nonfinite_steps non-finite updates in a row.
  """
  lock = lock_workdir(config, workdir)
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
  source = make_source(config)  # bad data is refused before anything compiles
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

  step_fn = compile_train_step_for_backend(config, model, optimizer, mesh, state, workdir)
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
    with make_pipeline(config, start) as pipeline:
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
