"""WORKDIR/train.lock: one live training job per workdir; a dead holder's lock is taken
over, at once when it is known dead, after one unchanged lease otherwise."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from cfgdiff import files, workdir_lock


def _holder(workdir) -> dict:
  return json.loads((workdir / "train.lock").read_text())


def _write_holder(workdir, **fields) -> None:
  """A lock as another job would have written it: on another host unless told."""
  holder = {"host": "elsewhere", "pid": 1, "boot": "other-boot", "pid_ns": "",
            "job": "", "attempt": 0, "token": "old", "beat": 1, "heartbeat": time.time()}
  (workdir / "train.lock").write_text(json.dumps(holder | fields))


def _this_host() -> dict:
  me = workdir_lock._owner()
  return {k: me[k] for k in ("host", "boot", "pid_ns")}


class _LiveElsewhere:
  """Another host's job: rewrites the lock with a growing beat count, its clock skewed."""

  def __init__(self, workdir, every: float, **fields):
    self._workdir, self._every, self._fields = workdir, every, fields
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    beat = 0
    while not self._stop.wait(self._every):
      beat += 1
      _write_holder(self._workdir, beat=beat, **self._fields)

  def __enter__(self):
    _write_holder(self._workdir, **self._fields)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def test_second_lock_on_a_live_workdir_is_refused_at_once_and_the_first_kept(tmp_path):
  first = workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=600)
  first.acquire()
  holder = _holder(tmp_path)
  started = time.monotonic()
  with pytest.raises(workdir_lock.WorkdirBusyError, match=f"pid {os.getpid()}"):
    workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=600).acquire()
  assert time.monotonic() - started < 5, "a live process on this host needs no watching"
  assert _holder(tmp_path)["token"] == holder["token"]
  first.release()
  assert not (tmp_path / "train.lock").exists()
  again = workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=600)
  again.acquire()
  again.release()


def test_heartbeat_rewrites_the_lock_within_a_lease(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=0.8)
  lock.acquire()
  first = _holder(tmp_path)["beat"]
  time.sleep(1.5)  # longer than the lease: only the heartbeat keeps it live
  assert _holder(tmp_path)["beat"] > first
  assert lock.held() and not lock.lost
  lock.release()


def test_a_lock_caught_half_written_is_a_live_job_named_by_its_whole_content(tmp_path):
  _write_holder(tmp_path)
  timer = threading.Timer(0.3, lambda: (tmp_path / "train.lock").write_text(""))
  timer.start()  # mid-write by a non-atomic store: the job is alive
  try:
    with pytest.raises(workdir_lock.WorkdirBusyError, match="host elsewhere"):
      workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=2).acquire(poll_seconds=0.05)
  finally:
    timer.join()


@pytest.mark.parametrize("skew_seconds", [-1e6, 0.0])
def test_a_live_job_elsewhere_is_refused_however_its_clock_is_skewed(tmp_path, skew_seconds):
  # Its heartbeat looks 11 days old by our clock (or current): the lock keeps changing,
  # which is all that counts.
  with _LiveElsewhere(tmp_path, every=0.3, heartbeat=time.time() + skew_seconds):
    with pytest.raises(workdir_lock.WorkdirBusyError, match="host elsewhere"):
      workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=2).acquire()
  assert _holder(tmp_path)["token"] == "old"


def test_an_unchanging_lock_is_taken_after_one_lease_even_from_a_future_clock(tmp_path):
  # A job elsewhere that died, whose clock ran a day ahead: its heartbeat looks fresh.
  _write_holder(tmp_path, heartbeat=time.time() + 86400)
  lock = workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=1.5)
  started = time.monotonic()
  lock.acquire()
  assert time.monotonic() - started >= 1.5
  assert _holder(tmp_path)["token"] == lock._owner["token"]
  lock.release()


def test_a_requeued_cluster_job_takes_its_own_lock_at_once(tmp_path, monkeypatch):
  # SLURM requeued job 4242 onto another node after the first node died mid-run.
  _write_holder(tmp_path, job="4242", attempt=0)
  monkeypatch.setenv("SLURM_JOB_ID", "4242")
  monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
  lock = workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=600)
  started = time.monotonic()
  lock.acquire()
  assert time.monotonic() - started < 5
  assert _holder(tmp_path)["job"] == "4242" and _holder(tmp_path)["attempt"] == 1
  lock.release()


def test_another_cluster_job_is_refused_while_the_holder_lives(tmp_path, monkeypatch):
  monkeypatch.setenv("SLURM_JOB_ID", "4243")  # a double submit, not a restart of 4242
  monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
  with _LiveElsewhere(tmp_path, every=0.3, job="4242", attempt=0):
    with pytest.raises(workdir_lock.WorkdirBusyError, match="cluster job 4242 restart 0"):
      workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=2).acquire()


def test_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  _write_holder(tmp_path, pid=int(dead.stdout), **_this_host())
  lock = workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=600)
  lock.acquire()  # a fresh heartbeat, but its process is gone
  assert _holder(tmp_path)["token"] != "old"
  lock.release()


def test_a_host_that_rebooted_takes_its_lock_at_once(tmp_path):
  _write_holder(tmp_path, pid=os.getpid(), **(_this_host() | {"boot": "before-reboot"}))
  lock = workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=600)
  lock.acquire()
  assert _holder(tmp_path)["token"] != "old"
  lock.release()


def test_a_new_owner_is_never_overwritten_by_the_old_heartbeat(tmp_path):
  old = workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=0.4)
  old.acquire()
  assert old.held()
  # Someone took the lock over (the old job looked dead): the old heartbeat stops.
  _write_holder(tmp_path, token="new")
  time.sleep(0.5)
  assert old.lost and not old.held() and old.taken_by["token"] == "new"
  assert "taken over by another job (host elsewhere" in str(old.lost_error())
  assert _holder(tmp_path)["token"] == "new"
  old.release()
  assert _holder(tmp_path)["token"] == "new"


def test_held_reads_the_lock_before_the_heartbeat_does(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=600)  # no beat for 150 s
  lock.acquire()
  _write_holder(tmp_path, token="new")
  assert not lock.held() and lock.lost
  lock.release()


def test_the_heartbeat_survives_a_disk_that_refuses_writes(tmp_path, monkeypatch):
  lock = workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=0.4)
  lock.acquire()
  real_write = files.write_atomic
  failing = threading.Event()
  failing.set()

  def write_atomic(path, text):
    if failing.is_set():
      raise OSError(28, "No space left on device")
    real_write(path, text)

  monkeypatch.setattr(files, "write_atomic", write_atomic)
  beat = _holder(tmp_path)["beat"]
  time.sleep(0.6)
  assert _holder(tmp_path)["beat"] == beat and lock._thread.is_alive()
  failing.clear()  # the disk has room again
  time.sleep(0.6)
  assert _holder(tmp_path)["beat"] > beat and lock.held()
  lock.release()
  assert not (tmp_path / "train.lock").exists()


def test_an_unreadable_lock_is_never_taken_as_absent(tmp_path, tiny_config):
  (tmp_path / "run" / "train.lock").mkdir(parents=True)  # cannot be read as a file
  with pytest.raises(workdir_lock.WorkdirBusyError, match="cannot take .*IsADirectoryError"):
    workdir_lock.lock_for_training(str(tmp_path / "run"),
                                   tiny_config.runtime.workdir_lease_seconds)
  assert (tmp_path / "run" / "train.lock").is_dir()


def test_a_lock_that_cannot_be_written_is_one_error_on_every_process(tmp_path, tiny_config):
  (tmp_path / "a_file").write_text("")
  with pytest.raises(workdir_lock.WorkdirBusyError, match="cannot take"):
    workdir_lock.lock_for_training(str(tmp_path / "a_file" / "run"),
                                   tiny_config.runtime.workdir_lease_seconds)
