"""SIGTERM, from the first line of `cfgdiff.main` to the last save, and the exit codes a
launcher acts on.

Clusters send SIGTERM before they stop a job (SLURM's --signal, TPU VM maintenance,
Kubernetes). `install` puts one handler in place before anything else runs, so a SIGTERM
during start-up, the lock, the restore or the compile is remembered rather than killing
the job or being dropped, and the handler is never put back, so a second SIGTERM during
the preemption save cannot interrupt it.

With ``--multihost`` jax.distributed.initialize starts JAX's preemption sync manager,
whose own handler then receives SIGTERM; `StopAgreement` asks it (every host stops at the
same step) and also counts the SIGTERMs this module saw before it took over. This module
imports JAX only when asked to agree: `install` runs before XLA's flags are set.
"""

from __future__ import annotations

import signal

# Exit codes (sysexits' EX_TEMPFAIL and the range above it), for launchers.
EXIT_PREEMPTED = 75  # saved on SIGTERM before the last step: requeue
EXIT_LOCK_LOST = 76  # another job took the workdir over: do not requeue
EXIT_STALLED = 77  # no step for runtime.step_timeout_seconds (hung or dead peer): requeue
EXIT_DIVERGED = 78  # train.max_nonfinite_steps non-finite updates in a row: do not requeue
REQUEUE_CODES = (EXIT_PREEMPTED, EXIT_STALLED)

_received = 0  # SIGTERMs this module's handler has seen


class Preempted(Exception):
  """Raised where work stops on SIGTERM with nothing left unsaved (sweep, sample)."""


def _handler(signum, frame) -> None:
  del signum, frame
  global _received
  _received += 1


def install() -> None:
  """Catches SIGTERM from now on (call once, first thing in main)."""
  signal.signal(signal.SIGTERM, _handler)


def received() -> int:
  """SIGTERMs seen by this module's handler (not those JAX's sync manager took)."""
  return _received


class StopAgreement:
  """Whether to stop now, the same answer on every process.

  Call `should_stop` with the same increasing counter (the train step, a sweep's chunk
  number) on every process. With JAX's preemption sync manager (``--multihost``) it
  answers True on every host at the same counter, a step or two after any host got
  SIGTERM, with no collective per call; without it, on one process it reads the flag,
  and on several it agrees with one small collective per call.
  """

  def __init__(self):
    # pylint: disable-next=g-import-not-at-top
    from jax._src import distributed
    self._sync = distributed.global_state.preemption_sync_manager is not None
    self._early: bool | None = None
    self._calls = 0  # stop_here's own counter

  def stop_here(self, saved: str) -> None:
    """For work without steps (sweep, sample; every process calls it equally often):
    raises Preempted on every process once a SIGTERM came; ``saved`` says what is kept."""
    self._calls += 1
    if self.should_stop(self._calls):
      raise Preempted(f"Preempted (SIGTERM): {saved}; run the same command again to "
                      "continue.")

  def should_stop(self, counter: int) -> bool:
    import jax  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    from cfgdiff import multihost  # pylint: disable=g-import-not-at-top
    if self._early is None:  # a SIGTERM before JAX's handler took over (collective, once)
      self._early = multihost.any_process(_received > 0) if self._sync else False
    if self._sync:
      return self._early or multihost_utils.reached_preemption_sync_point(counter)
    if jax.process_count() == 1:
      return _received > 0
    return multihost.any_process(_received > 0)
