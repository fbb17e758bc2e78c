"""Which convolution kernel gradient the CPU trains with: timed once per run, then kept.

XLA:CPU's own kernel gradient and `cfgdiff.models.conv`'s tap products win on different CPUs
and models (BENCHMARKS.md), so train.kernel_gradient = "auto" times the whole step both ways
and keeps the faster, recording the choice in WORKDIR/kernel_gradient.json for resumes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from cfgdiff import build, files, multihost, train_step
from cfgdiff.models import UNet

Array = jnp.ndarray

_KERNEL_GRADIENT_FILE = "kernel_gradient.json"
_TIMED = ("taps", "xla")  # the kernel gradients "auto" chooses between
_TIMED_STEPS = 5  # per variant and round; two rounds, alternating


def compile_train_step(config: ml_collections.ConfigDict, model: UNet,
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
    steps = {name: train_step.compile_train_step(
                 config, model.clone(kernel_grad_taps=name == "taps"), optimizer, mesh
             ).lower(state, batch).compile() for name in _TIMED}
    seconds = multihost.agreed(_time_steps(steps, state, batch))
    mode = min(seconds, key=seconds.get)
    logging.info("Kernel gradient: %s (train step %.3f s with conv.py's tap products, %.3f s "
                 "with XLA's; compiled and timed in %.0f s).", mode, seconds["taps"],
                 seconds["xla"], time.perf_counter() - start)
    step_fn = steps[mode]
  else:
    step_fn = train_step.compile_train_step(config, model.clone(kernel_grad_taps=mode == "taps"),
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
  `compile_train_step` saved it, or "auto" if none is saved."""
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
