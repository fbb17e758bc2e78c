"""Orbax checkpoints in WORKDIR/checkpoints: atomic saves, the last few kept, resume."""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from cfgdiff import files


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


class Checkpointer:
  """Saves and restores {train state, data position} pairs indexed by step.

  Orbax writes each step to a temporary folder and renames it when complete, so a run
  killed mid-save leaves the previous checkpoints intact and readable.
  """

  def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
    self.directory = files.path(workdir) / "checkpoints"
    if read_only and not self.directory.is_dir():
      raise CheckpointError(f"no checkpoint in {self.directory}; train first with "
                            "--mode=train or point --workdir at a trained run.")
    if read_only:
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
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_position: dict[str, int]) -> None:
    """Starts an (asynchronous) save; device arrays are copied before it returns."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)))

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
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for damaged or mismatched files.
      raise CheckpointError(
          f"checkpoint {self.directory / str(step)} cannot be restored "
          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). If the files are "
          "damaged, move that step folder aside to resume from the one before; if the config "
          "changed, use the config the run was trained with or a new --workdir.") from e
    return restored.state, dict(restored.data)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

