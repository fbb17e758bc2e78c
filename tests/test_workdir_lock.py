"""WORKDIR/train.lock: one live training job per workdir; stale locks are taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from cfgdiff import workdir_lock


def _holder(workdir) -> dict:
  return json.loads((workdir / "train.lock").read_text())


def _write_holder(workdir, host: str, pid: int, token: str, heartbeat: float) -> None:
  """A lock as another job would have written it."""
  (workdir / "train.lock").write_text(json.dumps(
      {"host": host, "pid": pid, "token": token, "heartbeat": heartbeat}))


def test_second_lock_on_a_live_workdir_is_refused_and_the_first_kept(tmp_path):
  first = workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=60)
  first.acquire()
  holder = _holder(tmp_path)
  with pytest.raises(workdir_lock.WorkdirBusyError, match=f"pid {os.getpid()}"):
    workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=60).acquire()
  assert _holder(tmp_path)["token"] == holder["token"]
  first.release()
  assert not (tmp_path / "train.lock").exists()
  again = workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=60)
  again.acquire()
  again.release()


def test_heartbeat_keeps_the_lease_alive(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=0.8)
  lock.acquire()
  first = _holder(tmp_path)["heartbeat"]
  time.sleep(1.5)  # longer than the lease: only the heartbeat keeps it live
  assert _holder(tmp_path)["heartbeat"] > first
  with pytest.raises(workdir_lock.WorkdirBusyError):
    workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=0.8).acquire()
  lock.release()


def test_stale_lock_is_taken_over(tmp_path):
  # A job on another host that stopped heart-beating longer ago than the lease.
  _write_holder(tmp_path, "elsewhere", 1, "old", time.time() - 100)
  lock = workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=10)
  lock.acquire()
  assert _holder(tmp_path)["token"] != "old"
  lock.release()


def test_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  _write_holder(tmp_path, socket.gethostname(), int(dead.stdout), "old", time.time())
  lock = workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=600)
  lock.acquire()  # a fresh heartbeat, but its process is gone
  assert _holder(tmp_path)["token"] != "old"
  lock.release()


def test_a_new_owner_is_never_overwritten_by_the_old_heartbeat(tmp_path):
  old = workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=0.4)
  old.acquire()
  # Someone took the lock over (e.g. the old job looked dead): the old heartbeat stops.
  _write_holder(tmp_path, "elsewhere", 1, "new", time.time())
  time.sleep(0.5)
  assert _holder(tmp_path)["token"] == "new"
  old.release()
  assert _holder(tmp_path)["token"] == "new"


def test_a_lock_that_cannot_be_written_is_one_error_on_every_process(tmp_path, tiny_config):
  from cfgdiff import train
  (tmp_path / "a_file").write_text("")
  with pytest.raises(workdir_lock.WorkdirBusyError, match="cannot take"):
    train.lock_workdir(tiny_config, str(tmp_path / "a_file" / "run"))
