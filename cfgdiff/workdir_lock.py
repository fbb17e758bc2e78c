"""One training job per workdir: WORKDIR/train.lock, a lease kept alive by a heartbeat.

Two jobs training into one workdir (a double launch, or a requeue racing the job it
replaces) would each delete the other's checkpoints. The first job writes ``train.lock``
naming itself and rewrites it every ``lease / 4`` seconds with an increasing beat count.
A second job takes the lock over only when its holder is known to be gone:

- the same cluster job, restarted: the same SLURM_JOB_ID (or CFGDIFF_JOB_ID) with a higher
  SLURM_RESTART_COUNT (or CFGDIFF_JOB_ATTEMPT): the scheduler ended the old one;
- the same host, and the holder's process is gone (same boot and pid namespace), or the
  host has rebooted since (a TPU VM that came back); a live holder there is refused at once;
- otherwise, when the lock has not changed for a whole lease, watched on this host's own
  monotonic clock: no two hosts' clocks are ever compared, so clock skew cannot make a
  live job look dead.

A holder that finds another job's token in the lock (it was taken over after looking
dead: a long pause, a stalled disk) marks itself `lost`: the training loop then stops
without saving anything more. Write errors in the heartbeat (a full or read-only disk)
are logged once and retried; they never end the thread.

On a bucket (gs://, through `cfgdiff.files`) writes are last-writer-wins: two jobs taking
over the same stale lock within the read-back delay could both believe they hold it
(epath offers no conditional create). Each then finds the other's token at its first
heartbeat, and the loser stops before its next save.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import jax
from absl import logging

from cfgdiff import files, multihost

LOCK_FILE = "train.lock"


class WorkdirBusyError(RuntimeError):
  """Another live job is training in this workdir."""


class LockLostError(RuntimeError):
  """This job's lock was taken over by another job; it must stop without saving."""


def _read_text(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return ""


def _owner() -> dict:
  """Who we are: for the takeover rules above and the message another job prints."""
  env = os.environ
  try:
    pid_namespace = os.readlink("/proc/self/ns/pid")
  except OSError:
    pid_namespace = ""
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "boot": _read_text("/proc/sys/kernel/random/boot_id"), "pid_ns": pid_namespace,
          "job": env.get("CFGDIFF_JOB_ID") or env.get("SLURM_JOB_ID", ""),
          "attempt": int(env.get("CFGDIFF_JOB_ATTEMPT") or env.get("SLURM_RESTART_COUNT") or 0),
          "token": uuid.uuid4().hex}


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def known_gone(holder: dict, me: dict) -> str:
  """Why ``holder``'s job is certainly over, from ``me``'s point of view ('' if unknown)."""
  if holder.get("job") and holder.get("job") == me["job"] and (
      int(holder.get("attempt", 0)) < me["attempt"]):
    return f"this is restart {me['attempt']} of its cluster job {me['job']}"
  if holder.get("host") != me["host"] or not holder.get("boot"):
    return ""
  if holder["boot"] != me["boot"]:
    return f"host {me['host']} has rebooted since"
  if holder.get("pid_ns") == me["pid_ns"] and not _pid_alive(int(holder.get("pid", -1))):
    return f"its process {holder.get('pid')} on this host has ended"
  return ""


def known_alive(holder: dict, me: dict) -> bool:
  """True when ``holder`` is a live process on this very host (same boot, pid namespace)."""
  return (holder.get("host") == me["host"] and bool(holder.get("boot"))
          and holder.get("boot") == me["boot"] and holder.get("pid_ns") == me["pid_ns"]
          and holder.get("token") != me["token"] and _pid_alive(int(holder.get("pid", -1))))


class WorkdirLock:
  """Holds WORKDIR/train.lock while a training job runs; see the module docstring.

  Args:
    workdir: the run's directory (local path or gs://...).
    lease_seconds: a lock unchanged for this long (watched here) is stale.
  """

  def __init__(self, workdir: str, lease_seconds: float):
    self.path = files.path(workdir) / LOCK_FILE
    self.lease_seconds = float(lease_seconds)
    self._owner = _owner()
    self._beat = 0
    self._stop = threading.Event()
    self._lost = threading.Event()
    self.taken_by: dict | None = None  # the job that took the lock over, once lost
    self._thread: threading.Thread | None = None
    self._write_failing = False

  def _read(self) -> dict | None:
    """The lock's content; None when there is no lock. Raises OSError when it cannot be
    read: an unreadable lock is never counted as absent."""
    try:
      text = self.path.read_text()
    except FileNotFoundError:
      return None
    try:
      holder = json.loads(text)
      return holder if isinstance(holder, dict) else {"unparsed": text[:200]}
    except ValueError:  # half-written by a non-atomic store: someone is writing it
      return {"unparsed": text[:200]}

  def _write(self) -> None:
    self._beat += 1
    files.write_atomic(self.path, json.dumps(
        self._owner | {"beat": self._beat, "heartbeat": time.time()}))

  def _ours(self, holder: dict | None) -> bool:
    return holder is not None and holder.get("token") == self._owner["token"]

  def _watch(self, holder: dict, poll_seconds: float) -> dict | None:
    """Watches ``holder``'s lock for one lease on this host's clock: the lock's content
    if it changed (its job is alive), None if it did not (stale)."""
    logging.warning("%s is held by %s; watching it for up to %.0f s to see whether that "
                    "job is alive.", self.path, _describe(holder), self.lease_seconds)
    deadline = time.monotonic() + self.lease_seconds
    while time.monotonic() < deadline:
      time.sleep(min(poll_seconds, max(0.0, deadline - time.monotonic())))
      now = self._read()
      if now is None:
        return None  # released meanwhile
      if now != holder:
        return now
    return None

  def acquire(self, poll_seconds: float | None = None) -> None:
    """Takes the lock or raises WorkdirBusyError naming the job that holds it.

    Waits up to one lease when the holder's state cannot be known otherwise (see the
    module docstring); ``poll_seconds`` (default lease / 20) is how often it looks.
    """
    poll_seconds = poll_seconds or self.lease_seconds / 20
    holder = self._read()
    if holder is not None:
      reason = known_gone(holder, self._owner)
      if reason:
        logging.warning("Taking over %s from %s: %s.", self.path, _describe(holder), reason)
      elif known_alive(holder, self._owner):
        raise self._busy(holder)
      else:
        live = self._watch(holder, poll_seconds)
        if live is not None:  # a half-written lock proves life; the whole one names the job
          raise self._busy(holder if "unparsed" in live else live)
        logging.warning("Taking over %s: it did not change for %.0f s.", self.path,
                        self.lease_seconds)
    self._write()
    time.sleep(min(0.2, self.lease_seconds / 10))  # let a racing writer land, then check
    now = self._read()
    if not self._ours(now):
      raise self._busy(now or {})  # a racing job won (or removed ours)
    self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                    name="workdir-lock-heartbeat")
    self._thread.start()

  def _busy(self, holder: dict) -> WorkdirBusyError:
    return WorkdirBusyError(
        f"{self.path.parent} is being trained by a live job ({_describe(holder)}); "
        "starting a second one would delete its checkpoints. Wait for it to finish, stop "
        f"it, or use another --workdir. If that job is dead, a restart of the same cluster "
        f"job takes the lock at once; any other job after the lock has not changed for "
        f"{self.lease_seconds:.0f} s (or remove {self.path}).")

  @property
  def lost(self) -> bool:
    """True once another job's token was found in the lock."""
    return self._lost.is_set()

  def held(self) -> bool:
    """Reads the lock now (before a save): False once another job's token is in it."""
    if self._lost.is_set():
      return False
    try:
      holder = self._read()
    except OSError:
      return True  # unreadable now: the heartbeat keeps trying, the lease decides
    if holder is not None and not self._ours(holder):
      self._mark_lost(holder)
      return False
    return True

  def _mark_lost(self, holder: dict) -> None:
    self.taken_by = holder
    self._lost.set()

  def lost_error(self) -> LockLostError:
    return LockLostError(
        f"{self.path} was taken over by another job ({_describe(self.taken_by or {})}) "
        "while this one looked dead; this job stopped without saving more. Check that only "
        "one job trains into this workdir (runtime.workdir_lease_seconds must exceed any "
        "pause of this job).")

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.lease_seconds / 4):
      try:
        holder = self._read()
        if holder is not None and not self._ours(holder):
          self._mark_lost(holder)  # never overwrite the new owner
          logging.error("%s", self.lost_error())
          return
        self._write()
        if self._write_failing:
          logging.warning("%s is writable again; the heartbeat goes on.", self.path)
          self._write_failing = False
      except OSError as e:  # full or read-only disk, a bucket's hiccup: keep trying
        if not self._write_failing:
          logging.warning("Cannot refresh %s (%s: %s); retrying every %.0f s. If this lasts "
                          "%.0f s another job may take the workdir over, and this one will "
                          "then stop.", self.path, type(e).__name__, e, self.lease_seconds / 4,
                          self.lease_seconds)
          self._write_failing = True

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
      try:
        if self._ours(self._read()):
          self.path.unlink(missing_ok=True)
      except OSError as e:
        logging.warning("Could not remove %s (%s); the next run of this job takes it over.",
                        self.path, e)


def _describe(holder: dict) -> str:
  if "unparsed" in holder:
    return f"unreadable content {holder['unparsed']!r}"
  job = f", cluster job {holder['job']} restart {holder.get('attempt', 0)}" if holder.get(
      "job") else ""
  age = time.time() - float(holder.get("heartbeat", 0))
  return (f"host {holder.get('host')}, pid {holder.get('pid')}{job}, heartbeat {age:.0f} s "
          "ago by its clock")


def lock_for_training(workdir: str, lease_seconds: float) -> WorkdirLock | None:
  """Process 0 takes WORKDIR/train.lock and every process learns whether it got it.

  Raises WorkdirBusyError on every process, before anything is written, when another
  live job holds the workdir. Returns the lock on process 0, None elsewhere.
  """
  lock, message = None, ""
  if jax.process_index() == 0:
    lock = WorkdirLock(workdir, lease_seconds)
    try:
      lock.acquire()
    except Exception as e:  # every process must learn it failed, or the others wait
      lock, message = None, (str(e) if isinstance(e, WorkdirBusyError) else
                             f"cannot take {workdir}/train.lock ({type(e).__name__}: {e}).")
  message = multihost.agreed(message)
  if message:
    raise WorkdirBusyError(message)
  return lock
