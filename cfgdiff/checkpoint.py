"""Orbax checkpoints in WORKDIR/checkpoints: atomic saves, the last few kept, resume."""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import sys
import threading
import time
import traceback
import types
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from cfgdiff import build, files, multihost

DAMAGED_DIR = "checkpoints_damaged"  # beside checkpoints/: steps that failed to restore


class CheckpointError(RuntimeError):
  """A checkpoint that is missing, unreadable or does not match the config."""


def saved_steps(workdir: str) -> list[int]:
  """The finished checkpoint steps in WORKDIR/checkpoints, in order, from the folders
  alone: on a local disk Orbax gives a step's folder its number only once the save is
  complete; on a bucket it marks it with commit_success.txt.

  For readers beside a live training job. Unlike a `Checkpointer`, whose Orbax manager
  synchronises all processes when it is made, it can be called by one process alone.
  """
  folder = files.path(workdir) / "checkpoints"
  if not folder.is_dir():
    return []
  steps = [p for p in folder.iterdir() if p.name.isdigit()]
  if "://" in str(folder):
    # On object stores (gs://) Orbax writes into N/ directly and marks a finished save
    # with commit_success.txt instead of renaming a temporary folder.
    steps = [p for p in steps if (p / "commit_success.txt").exists()]
  return sorted(int(p.name) for p in steps)


_ORBAX = f"{os.sep}orbax{os.sep}"  # in the path of Orbax's source files


class _AbandonedReads(std_logging.Filter):
  """Keeps the late echoes of a failed read-only restore out of the log.

  When one array of a step cannot be read (training deleted the step meanwhile), Orbax's
  restore raises at once while its other reads are still in flight on TensorStore's
  threads. Each of them fails later and prints a traceback of its own, in one of three
  ways: an exception inside Orbax's abandoned coroutine, or "Event loop is closed" when
  its result comes back to the asyncio loop the restore already closed (both through
  ``sys.unraisablehook``), or asyncio's "Task exception was never retrieved" for an Orbax
  task (through the "asyncio" logger). The failure itself is raised as CheckpointError, so
  while a read-only restore runs and for ECHO_SECONDS after one failed (echoes can come
  before the error is raised, and after), these three are counted in a debug line.
  Everything else, and these too at any other time, goes where it went before: an echo
  whose coroutine the garbage collector frees only after ECHO_SECONDS would print (in
  the tests they all came within 2 s).
  """

  ECHO_SECONDS = 60.0

  def __init__(self):
    super().__init__()
    # Reentrant: a garbage collection inside a locked section can finalise an abandoned
    # coroutine, whose report comes back into the hook on the same thread.
    self._lock = threading.RLock()
    self._previous_hook = None  # the process's hook before ours, set once by install()
    self._reading = 0  # read-only restores running now
    self._quiet_until = 0.0  # time.monotonic() until which a failed restore may echo
    self.ignored = 0

  def install(self) -> None:
    """Puts the filters in place, once per process; they act only around a failure."""
    with self._lock:
      if self._previous_hook is None:
        self._previous_hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable_hook
        std_logging.getLogger("asyncio").addFilter(self)

  @contextlib.contextmanager
  def reading(self) -> Iterator[None]:
    """Wraps one read-only restore."""
    with self._lock:
      self._reading += 1
    try:
      yield
    except BaseException:  # also an interrupt: the reads it abandoned still fail later
      with self._lock:
        self._quiet_until = time.monotonic() + self.ECHO_SECONDS
      raise
    finally:
      with self._lock:
        self._reading -= 1

  def _expecting_echoes(self) -> bool:
    with self._lock:
      return self._reading > 0 or time.monotonic() < self._quiet_until

  @staticmethod
  def _is_echo(unraisable: Any) -> bool:
    """Whether a sys.unraisablehook argument is one of an abandoned read's two echoes."""
    error, source = unraisable.exc_value, unraisable.object
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      return any(frame.f_code.co_name == "call_soon_threadsafe"
                 for frame, _ in traceback.walk_tb(unraisable.exc_traceback))
    return isinstance(source, types.CoroutineType) and _ORBAX in source.cr_code.co_filename

  def _ignore(self, kind: str) -> None:
    with self._lock:
      self.ignored += 1
      count = self.ignored
    logging.debug("Ignored a late error of an abandoned checkpoint read (%d so far): %s",
                  count, kind)

  def _unraisable_hook(self, unraisable: Any) -> None:
    try:
      echo = self._expecting_echoes() and self._is_echo(unraisable)
    except Exception:  # never lose the report because the check itself failed
      echo = False
    if echo:
      self._ignore(type(unraisable.exc_value).__name__)
    else:
      self._previous_hook(unraisable)

  def filter(self, record: std_logging.LogRecord) -> bool:
    """For the asyncio logger: False (drop) for an abandoned Orbax task's record."""
    message = record.getMessage()
    if (message.startswith("Task exception was never retrieved")
        and _ORBAX in message and self._expecting_echoes()):
      self._ignore("task exception never retrieved")
      return False
    return True


_abandoned_reads = _AbandonedReads()


class Checkpointer:
  """Saves and restores {train state, data position} pairs indexed by step.

  Orbax writes each step to a temporary folder and renames it when complete, so a run
  killed mid-save leaves the previous checkpoints intact and readable. A writer (made by
  the job that holds the workdir lock) removes such a killed save's temporary folders
  when it starts.
  """

  def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
    self.directory = files.path(workdir) / "checkpoints"
    self._read_only = read_only
    if read_only and not self.directory.is_dir():
      raise CheckpointError(f"no checkpoint in {self.directory}; train first with "
                            "--mode=train or point --workdir at a trained run.")
    if read_only:
      _abandoned_reads.install()  # a reader beside training: a step can vanish mid-read
      # Each process reads on its own, with none of Orbax's cross-process barriers: beside
      # a live training job one process can fail to read a step that training just
      # deleted while the others read it, and a barrier the failed process skips would
      # pair with the next collective it makes (the sweep's agreement on the failure).
      me = jax.process_index()
      options = ocp.CheckpointManagerOptions(
          read_only=True, create=False, max_to_keep=None, save_interval_steps=0,
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              primary_host=me, active_processes={me}))
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_position: dict[str, int]) -> None:
    """Starts an (asynchronous) save; device arrays are copied before it returns.

    Never replaces a committed step (another job's, if two ever wrote here): that is an
    error. A failed earlier asynchronous save is raised here at the latest.
    """
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)))
    except ocp.checkpoint_manager.StepAlreadyExistsError as e:
      raise CheckpointError(
          f"checkpoint {self.directory / str(step)} already exists and is never replaced: "
          "another job has trained in this workdir. Check that only one job trains here, "
          "then resume.") from e
    except Exception as e:  # pylint: disable=broad-except  # a full disk, a failed write
      raise self._save_error(e) from e

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, int]]:
    """Restores into the structure, dtypes and shardings of ``abstract_state``.

    Args:
      abstract_state: a pytree of jax.ShapeDtypeStruct (with .sharding) like the state.
      step: which checkpoint; the latest when None.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}; train first with "
                            "--mode=train or point --workdir at a trained run.")
    try:
      with _abandoned_reads.reading() if self._read_only else contextlib.nullcontext():
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for damaged or mismatched files.
      raise CheckpointError(
          f"checkpoint {self.directory / str(step)} cannot be restored "
          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). If the files are "
          "damaged, move that step folder aside to resume from the one before; if the config "
          "changed, use the config the run was trained with or a new --workdir.") from e
    return restored.state, dict(restored.data)

  def restore_newest_good(self, abstract_state: Any) -> tuple[Any, dict[str, int], int]:
    """The newest step that restores: (state, data position, step).

    Newer steps that fail to restore on any process (files truncated or corrupted by a
    crash without fsync, or on NFS) are moved to WORKDIR/checkpoints_damaged/, never
    deleted, with one warning; then training resumes from the step before. Raises the
    newest step's CheckpointError, moving nothing, when no step restores. For the
    writer only (the job holding the workdir lock); every process must call it.
    """
    damaged: list[tuple[int, CheckpointError]] = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      error = None
      try:
        state, position = self.restore(abstract_state, step)
      except CheckpointError as e:
        error = e
      if multihost.any_process(error is not None):
        damaged.append((step, error or CheckpointError(
            f"checkpoint {self.directory / str(step)} failed to restore on another process.")))
        continue
      if damaged:
        failure = "".join(self._move_aside(bad, bad_error, step) for bad, bad_error in damaged)
        # Every process learns process 0's outcome, and reloads after it moved the folders.
        failure = multihost.agreed(failure)
        if failure:
          raise CheckpointError(failure)
        self._manager.reload()
      return state, position, step
    if damaged:
      raise damaged[0][1]
    raise CheckpointError(f"no checkpoint in {self.directory}.")

  def _move_aside(self, step: int, error: CheckpointError, previous: int) -> str:
    """Moves a damaged step out of checkpoints/ (process 0); returns what went wrong, ''."""
    target = self.directory.parent / DAMAGED_DIR / f"{step}-{int(time.time())}"
    logging.warning("%s Moving it to %s and resuming from step %d.",
                    str(error).split(" If the files")[0], target, previous)
    if jax.process_index() != 0:
      return ""
    try:
      target.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(target)
    except OSError as e:
      return (f"checkpoint {self.directory / str(step)} cannot be restored and cannot be "
              f"moved aside ({type(e).__name__}: {e}); move it out of {self.directory} by "
              f"hand to resume from step {previous}.")
    return ""

  def check_for_errors(self) -> None:
    """Raises CheckpointError if an asynchronous save has failed (e.g. a full disk)."""
    try:
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except  # whatever the writer raised
      raise self._save_error(e) from e

  def wait(self) -> None:
    """Waits for an asynchronous save; raises CheckpointError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(e) from e

  def _save_error(self, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"saving a checkpoint into {self.directory} failed ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}); the committed steps "
        f"{saved_steps(str(self.directory.parent))} are intact. Free space or fix the disk's "
        "permissions, then run the same command again to resume.")

  def close(self) -> None:
    self._manager.close()


def load_ema_params(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
                    step: int | None = None) -> tuple[Any, int]:
  """(EMA parameters, step) of checkpoint ``step`` (the latest when None) of a run
  trained with ``config``, read onto ``mesh``."""
  model = build.make_model(config)
  target = build.abstract_state(config, model, build.make_optimizer(config.train), mesh)
  reader = Checkpointer(workdir, read_only=True)
  try:
    state, _ = reader.restore(target, step)
  finally:
    reader.close()  # a polling sweep loads many times: no manager left behind each time
  return state.ema_params, int(state.step)
