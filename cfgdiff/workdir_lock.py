"""One training job per workdir: WORKDIR/train.lock, a lease kept alive by a heartbeat.

Two jobs training into one workdir (a double launch, or a SLURM requeue racing the job
it replaces) would each delete the other's unfinished checkpoints. The first job writes
``train.lock`` naming itself and rewrites it every ``lease / 4`` seconds; a second job
that finds a lock whose heartbeat is younger than the lease is refused before it writes
anything. A lock whose heartbeat is older than the lease, or whose process is known dead
(same host, pid gone), is stale and taken over. It works the same on a local disk and
on a bucket (gs://), through `cfgdiff.files`; on a bucket, two jobs started within the
same second could both pass the check, which the read-back below narrows but cannot
close (object stores offer no exclusive create through epath).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from cfgdiff import files

LOCK_FILE = "train.lock"


class WorkdirBusyError(RuntimeError):
  """Another live job is training in this workdir."""


def _owner() -> dict:
  """Who we are, for the message another job will print."""
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "slurm_job": os.environ.get("SLURM_JOB_ID", ""), "token": uuid.uuid4().hex}


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


class WorkdirLock:
  """Holds WORKDIR/train.lock while a training job runs; see the module docstring.

  Args:
    workdir: the run's directory (local path or gs://...).
    lease_seconds: a lock whose heartbeat is older than this is stale.
  """

  def __init__(self, workdir: str, lease_seconds: float):
    self.path = files.path(workdir) / LOCK_FILE
    self.lease_seconds = float(lease_seconds)
    self._owner = _owner()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _read(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (ValueError, OSError):  # half-written by a crashed job on a non-atomic store
      return None

  def _write(self) -> None:
    files.write_atomic(self.path, json.dumps(self._owner | {"heartbeat": time.time()}))

  def holder_if_live(self) -> dict | None:
    """The lock's content if it names a live job, else None (absent or stale)."""
    holder = self._read()
    if holder is None:
      return None
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder["pid"])):
      return None
    if time.time() - float(holder.get("heartbeat", 0)) > self.lease_seconds:
      return None
    return holder

  def acquire(self) -> None:
    """Takes the lock or raises WorkdirBusyError naming the job that holds it."""
    holder = self.holder_if_live()
    if holder is None:
      self._write()
      time.sleep(min(0.2, self.lease_seconds / 10))  # let a racing writer land, then check
      holder = self._read()
      if holder is not None and holder.get("token") == self._owner["token"]:
        self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                        name="workdir-lock-heartbeat")
        self._thread.start()
        return
    holder = holder or {}  # vanished between our write and the read-back: a racing job
    age = time.time() - float(holder.get("heartbeat", 0))
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    raise WorkdirBusyError(
        f"{self.path.parent} is being trained by a live job (host {holder.get('host')}, "
        f"pid {holder.get('pid')}{job}, heartbeat {age:.0f} s ago); starting a second one "
        "would delete its checkpoints. Wait for it to finish, stop it, or use another "
        f"--workdir. If that job is dead, its lock expires {self.lease_seconds:.0f} s after "
        f"its last heartbeat (or remove {self.path}).")

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.lease_seconds / 4):
      holder = self._read()
      if holder is not None and holder.get("token") != self._owner["token"]:
        return  # taken over after we looked dead: never overwrite the new owner
      self._write()

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      holder = self._read()
      if holder is not None and holder.get("token") == self._owner["token"]:
        self.path.unlink(missing_ok=True)
      self._thread = None
