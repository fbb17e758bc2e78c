"""A step watchdog: a training job whose steps stop finishing exits instead of hanging.

A hung peer (a stuck collective, a host paused by the hypervisor, a dead process whose
peers wait in an all-reduce) blocks every other process in its next collective, with no
error and no end. The watchdog thread notices that this process finished no step for
``timeout_seconds``, logs the last step each process reported (through the JAX
coordination service's key-value store, which stays reachable while the devices are
stuck), releases what ``on_stall`` releases (the workdir lock) and ends the process with
`preemption.EXIT_STALLED`, which the launchers requeue.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable

from absl import logging

from cfgdiff import preemption

_KEY = "cfgdiff/watchdog/step/{}"


def _client():
  """JAX's distributed client, or None in a single-process job without one."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


class StepWatchdog:
  """Exits the process when `beat` was not called for ``timeout_seconds``.

  Args:
    timeout_seconds: how long a step may take, saves and logging included.
    process_index, process_count: this process and the job's size (for the report).
    on_stall: called by the watchdog thread just before the process exits.
  """

  def __init__(self, timeout_seconds: float, process_index: int = 0, process_count: int = 1,
               on_stall: Callable[[], None] | None = None):
    self.timeout_seconds = float(timeout_seconds)
    self._index, self._count = process_index, process_count
    self._on_stall = on_stall
    self._last = time.monotonic()
    self._step = -1
    self._published = -float("inf")
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def start(self, step: int) -> None:
    """Arms the watchdog, ``step`` being the last step finished."""
    self.beat(step)
    self._thread = threading.Thread(target=self._watch, daemon=True, name="step-watchdog")
    self._thread.start()

  def beat(self, step: int) -> None:
    """Step ``step`` finished (cheap: call it every step)."""
    self._last, self._step = time.monotonic(), step
    if self._count > 1 and self._last - self._published > self.timeout_seconds / 10:
      self._published = self._last
      client = _client()
      if client is not None:
        try:
          client.key_value_set(_KEY.format(self._index), f"{step} {socket.gethostname()}",
                               allow_overwrite=True)
        except Exception as e:  # pylint: disable=broad-except  # a report, never a failure
          logging.debug("Watchdog: could not publish step %d (%s).", step, e)

  def stop(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None

  def _watch(self) -> None:
    while not self._stop.wait(min(5.0, self.timeout_seconds / 10)):
      if time.monotonic() - self._last > self.timeout_seconds:
        self._fire()

  def peers(self) -> str:
    """The last step each process published, e.g. 'process 0 (host a): step 12, ...'."""
    client = _client()
    if self._count == 1 or client is None:
      return f"process {self._index}: step {self._step}"
    reports = []
    for index in range(self._count):
      try:
        value = client.key_value_try_get(_KEY.format(index))
      except Exception:  # pylint: disable=broad-except  # not published, or unreachable
        value = None
      if value:
        step, host = value.split(" ", 1)
        reports.append(f"process {index} (host {host}): step {step}")
      else:
        reports.append(f"process {index}: no step reported")
    return ", ".join(reports)

  def _fire(self) -> None:
    # The coordinator may live in the hung process and the lock on a stalled disk: each
    # gets a bounded time in its own thread, and the exit happens regardless.
    report = [f"none (the coordination service did not answer in {_REPORT_SECONDS:.0f} s)"]
    _bounded(lambda: report.__setitem__(0, self.peers()))
    logging.error(
        "Watchdog: no training step finished for %.0f s on process %d (last finished step "
        "%d). Last steps reported: %s. A process far behind the others is the hung or dead "
        "one. Exiting with %d so that the launcher requeues the job "
        "(runtime.step_timeout_seconds sets the limit).", self.timeout_seconds, self._index,
        self._step, report[0], preemption.EXIT_STALLED)
    if self._on_stall is not None:
      _bounded(self._on_stall)
    logging.flush()
    sys.stderr.flush()
    os._exit(preemption.EXIT_STALLED)  # the main thread is stuck: no clean exit exists


_REPORT_SECONDS = 10.0


def _bounded(work: Callable[[], None]) -> None:
  """Runs ``work`` in a daemon thread for at most _REPORT_SECONDS; errors are logged."""
  def run():
    try:
      work()
    except Exception as e:  # pylint: disable=broad-except  # on the way out regardless
      logging.error("Watchdog: %s: %s", type(e).__name__, e)
  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(_REPORT_SECONDS)
