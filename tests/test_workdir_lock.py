"""WORKDIR/train.lock: one live training job per workdir; stale locks are taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from cfgdiff import workdir_lock


def test_second_lock_on_a_live_workdir_is_refused_and_the_first_kept(tmp_path):
  first = workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=60)
  first.acquire()
  holder = json.loads((tmp_path / "train.lock").read_text())
  with pytest.raises(workdir_lock.WorkdirBusyError, match=f"pid {os.getpid()}"):
    workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=60).acquire()
  assert json.loads((tmp_path / "train.lock").read_text())["token"] == holder["token"]
  first.release()
  assert not (tmp_path / "train.lock").exists()
  again = workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=60)
  again.acquire()
  again.release()


def test_heartbeat_keeps_the_lease_alive(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=0.8)
  lock.acquire()
  first = json.loads((tmp_path / "train.lock").read_text())["heartbeat"]
  time.sleep(1.5)  # longer than the lease: only the heartbeat keeps it live
  assert json.loads((tmp_path / "train.lock").read_text())["heartbeat"] > first
  with pytest.raises(workdir_lock.WorkdirBusyError):
    workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=0.8).acquire()
  lock.release()


def test_stale_lock_is_taken_over(tmp_path):
  # A job on another host that stopped heart-beating longer ago than the lease.
  (tmp_path / "train.lock").write_text(json.dumps(
      {"host": "elsewhere", "pid": 1, "token": "old", "heartbeat": time.time() - 100}))
  lock = workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=10)
  lock.acquire()
  assert json.loads((tmp_path / "train.lock").read_text())["token"] != "old"
  lock.release()


def test_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  (tmp_path / "train.lock").write_text(json.dumps(
      {"host": socket.gethostname(), "pid": int(dead.stdout), "token": "old",
       "heartbeat": time.time()}))
  lock = workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=600)
  lock.acquire()
  lock.release()


def test_a_new_owner_is_never_overwritten_by_the_old_heartbeat(tmp_path):
  old = workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=0.4)
  old.acquire()
  # Someone took the lock over (e.g. the old job looked dead): the old heartbeat stops.
  (tmp_path / "train.lock").write_text(json.dumps(
      {"host": "elsewhere", "pid": 1, "token": "new", "heartbeat": time.time()}))
  time.sleep(0.5)
  assert json.loads((tmp_path / "train.lock").read_text())["token"] == "new"
  old.release()
  assert json.loads((tmp_path / "train.lock").read_text())["token"] == "new"


def test_a_lock_that_cannot_be_written_is_one_error_on_every_process(tmp_path, tiny_config):
  from cfgdiff import train
  (tmp_path / "a_file").write_text("")
  with pytest.raises(workdir_lock.WorkdirBusyError, match="cannot take"):
    train.lock_workdir(tiny_config, str(tmp_path / "a_file" / "run"))
