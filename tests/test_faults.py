"""What clusters do to jobs, done to the real CLI: hard kills mid-save, a requeue onto
another host, a lock taken over, SIGTERM twice, a hung peer, a damaged newest step, a run
that diverges, and a resume under another config or dataset.

Each fault is injected from outside (signals, files), as a cluster would, never through a
hook in the library. Runs are compared bit for bit with one uninterrupted run.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cfgdiff import checkpoint, configs, resume, train, workdir_lock
from cfgdiff.sweep import orchestrate
from tests.conftest import (
  ROOT,
  SMALLEST_UNET,
  TINY_CONFIG,
  make_synthetic_dataset,
  max_abs_difference,
  run_cli,
  start_cli_processes,
  wait_cli_processes,
  wait_for,
)
from tests.test_train import _final_state

TARGET = 12  # steps of the uninterrupted reference run
IN_FLIGHT = "orbax-checkpoint-tmp"  # Orbax's name for a save not yet committed


def _common(data: str, workdir) -> list[str]:
  return [f"--config={TINY_CONFIG}", f"--config.data.path={data}", f"--workdir={workdir}"]


def _start(args: list[str], log_path, env: dict | None = None) -> subprocess.Popen:
  """The CLI in its own process group (as a job step), its console in ``log_path``."""
  with open(log_path, "w") as log:
    return subprocess.Popen([sys.executable, "-m", "cfgdiff.main", *args], cwd=ROOT,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {})),
                            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)


def _text(path) -> str:
  with open(path) as f:
    return f.read()


def _in_flight(workdir) -> list[str]:
  folder = os.path.join(workdir, "checkpoints")
  return [n for n in os.listdir(folder) if IN_FLIGHT in n] if os.path.isdir(folder) else []


def _assert_bitwise_equal(a, b) -> None:
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(synthetic_data, tmp_path_factory):
  """An uninterrupted run to TARGET, checkpoints at 3, 6, 9, 12; and its final state."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  proc = run_cli(*_common(synthetic_data, workdir), f"--config.train.num_steps={TARGET}",
                 "--config.train.keep_checkpoints=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert checkpoint.saved_steps(workdir) == [3, 6, 9, 12]
  return workdir, _final_state(workdir, TARGET, synthetic_data)


def _copy(reference_dir: str, tmp_path) -> str:
  return shutil.copytree(reference_dir, str(tmp_path / "copy"))


def test_sigkill_mid_save_then_requeue_on_another_host_equals_uninterrupted(
    reference, synthetic_data, tmp_path):
  workdir = str(tmp_path / "run")
  args = [*_common(synthetic_data, workdir), "--config.train.checkpoint_every_steps=1"]
  job = _start([*args, "--config.train.num_steps=100000"], tmp_path / "first.log",
               env={"SLURM_JOB_ID": "4242"})
  wait_for(lambda: len(checkpoint.saved_steps(workdir)) >= 2 and _in_flight(workdir), 600,
           "two committed steps and a save in flight", interval=0.02, proc=job)
  os.killpg(job.pid, signal.SIGKILL)  # the node died: no signal handler, no atexit
  job.wait()
  committed = checkpoint.saved_steps(workdir)
  assert _in_flight(workdir), "the kill should land while a save is in flight"
  assert committed[-1] < TARGET and os.path.exists(os.path.join(workdir, "train.lock"))

  # SLURM requeues job 4242 onto another node (another hostname: its pid cannot be
  # checked there); the restart count alone lets it take the dead run's lock at once.
  relaunch = subprocess.run(
      ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', "requeued-node",
       sys.executable, "-m", "cfgdiff.main", *args, f"--config.train.num_steps={TARGET}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", SLURM_JOB_ID="4242",
               SLURM_RESTART_COUNT="1"))
  assert relaunch.returncode == 0, relaunch.stderr[-3000:]
  assert "this is restart 1 of its cluster job 4242" in relaunch.stderr
  assert f"from step {committed[-1]}" in relaunch.stderr
  assert not _in_flight(workdir), "the half-written save is cleaned up"
  assert not os.path.exists(os.path.join(workdir, "train.lock"))
  _assert_bitwise_equal(_final_state(workdir, TARGET, synthetic_data), reference[1])


def test_a_job_whose_lock_was_taken_over_stops_without_saving_more(synthetic_data, tmp_path):
  workdir = str(tmp_path / "run")
  job = _start([*_common(synthetic_data, workdir), "--config.train.num_steps=100000",
                "--config.train.checkpoint_every_steps=2"], tmp_path / "job.log")
  wait_for(lambda: len(checkpoint.saved_steps(workdir)) >= 2, 600, "two checkpoints",
           interval=0.02, proc=job)
  # Another job took the workdir over (it judged this one dead) and wrote its own lock.
  lock = os.path.join(workdir, "train.lock")
  before = checkpoint.saved_steps(workdir)
  with open(lock + ".new", "w") as f:
    f.write(json.dumps(json.loads(_text(lock)) | {"host": "elsewhere", "token": "other-job"}))
  os.replace(lock + ".new", lock)
  assert job.wait(timeout=300) == 76, _text(tmp_path / "job.log")[-3000:]
  last = _text(tmp_path / "job.log").strip().splitlines()[-1]
  assert last.startswith("cfgdiff: error: ") and "taken over by another job" in last, last
  after = checkpoint.saved_steps(workdir)
  # At most the save already in flight when the lock changed; none started after.
  assert len([s for s in after if s > before[-1]]) <= 1, (before, after)
  assert json.loads(_text(lock))["token"] == "other-job", "the new owner's lock is kept"
  for step in after:  # every committed step is whole: state and data position agree
    assert int(_final_state(workdir, step, synthetic_data).step) == step


def test_sigterm_before_the_first_step_and_again_during_the_save(synthetic_data, tmp_path):
  """--multihost (JAX's preemption sync manager) with one process and its coordinator."""
  workdir = str(tmp_path / "run")
  logs = str(tmp_path / "logs")
  (job,) = start_cli_processes(1, *_common(synthetic_data, workdir),
                               "--config.train.num_steps=100000",
                               "--config.train.checkpoint_every_steps=100000", log_dir=logs)
  log = os.path.join(logs, "process_0.log")
  wait_for(lambda: "process(es); memory allocator" in _text(log), 300, "start-up",
           interval=0.02, proc=job)
  assert "Training 100000 steps" not in _text(log)
  job.send_signal(signal.SIGTERM)  # while it restores and compiles
  wait_for(lambda: "Preempted (SIGTERM) at step" in _text(log), 300, "the preemption",
           interval=0.02, proc=job)
  job.send_signal(signal.SIGTERM)  # the cluster insists while the save is in flight
  (text,) = wait_cli_processes([job], logs, timeout=300, expected_code=75)
  stopped = int(text.split("Preempted (SIGTERM) at step ")[1].split(":")[0])
  assert 1 <= stopped <= 3, "it stops a step or two after the signal, however early"
  assert checkpoint.saved_steps(workdir) == [stopped]
  assert not _in_flight(workdir) and not os.path.exists(os.path.join(workdir, "train.lock"))
  assert int(_final_state(workdir, stopped, synthetic_data).step) == stopped


def test_a_hung_peer_ends_the_job_within_the_step_timeout_and_the_rerun_finishes(
    synthetic_data, tmp_path):
  workdir = str(tmp_path / "run")
  timeout = 15
  args = [*_common(synthetic_data, workdir), "--config.model.dropout=0.0", *SMALLEST_UNET,
          "--config.train.log_every_steps=1", "--config.train.checkpoint_every_steps=3"]
  logs = str(tmp_path / "logs")
  procs = start_cli_processes(2, *args, "--config.train.num_steps=100000",
                              f"--config.runtime.step_timeout_seconds={timeout}", log_dir=logs)
  wait_for(lambda: checkpoint.saved_steps(workdir), 600, "the first checkpoint",
           interval=0.02, proc=procs[1])
  # Process 0 (the coordinator and the lock holder) hangs: a paused VM, a stuck driver.
  procs[0].send_signal(signal.SIGSTOP)
  hung_at = time.monotonic()
  try:
    code = procs[1].wait(timeout=timeout + 60)
  finally:
    procs[0].kill()  # what the scheduler does to the rest of a failed job
    procs[0].wait()
  waited = time.monotonic() - hung_at
  peer_log = _text(os.path.join(logs, "process_1.log"))
  assert code == 77, f"exit {code} after {waited:.0f} s:\n{peer_log[-3000:]}"
  assert "Watchdog: no training step finished" in peer_log
  assert waited < timeout + 30, waited  # the watchdog looks every timeout / 10
  # What the requeued job finds: whole checkpoints, and a lock it may take at once (its
  # holder's process is gone).
  committed = checkpoint.saved_steps(workdir)
  for step in committed:
    assert int(_final_state(workdir, step, synthetic_data).step) == step
  holder = json.loads(_text(os.path.join(workdir, "train.lock")))
  assert "has ended" in workdir_lock.known_gone(holder, workdir_lock._owner())

  end = committed[-1] + 3
  again = wait_cli_processes(
      start_cli_processes(2, *args, f"--config.train.num_steps={end}",
                          log_dir=str(tmp_path / "relaunch")), str(tmp_path / "relaunch"))
  assert f"from step {committed[-1]}" in again[0] and "has ended" in again[0]
  reference = str(tmp_path / "reference")
  proc = run_cli(*_common(synthetic_data, reference), *args[3:],
                 "--config.runtime.cpu_devices=2", f"--config.train.num_steps={end}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The bound of tests/test_multiprocess.py: Gloo's summation order, never a lost step.
  worst = max_abs_difference(*(_final_state(w, end, synthetic_data) for w in (workdir, reference)))
  assert worst < 3e-4, worst


def test_a_damaged_newest_step_is_moved_aside_and_training_redone_from_the_one_before(
    reference, synthetic_data, tmp_path, caplog):
  workdir = _copy(reference[0], tmp_path)
  newest = os.path.join(workdir, "checkpoints", str(TARGET))
  # A save cut short by a full disk: the largest array file lost its second half.
  sizes = {os.path.join(root, name): os.path.getsize(os.path.join(root, name))
           for root, _, names in os.walk(newest) for name in names}
  largest = max(sizes, key=sizes.get)
  os.truncate(largest, sizes[largest] // 2)

  # The sweep scores the step before it, leaving the damaged one for training to move.
  run = orchestrate.Run("copy", workdir, configs.from_json(os.path.join(workdir, "config.json")))
  sweep_config = configs.default_config()
  with caplog.at_level(logging.WARNING):
    sampler = orchestrate.restore_newest(run, sweep_config)
  assert sampler.step == TARGET - 3
  assert f"step {TARGET} cannot be restored" in caplog.text
  assert os.path.isdir(newest)

  proc = run_cli(*_common(synthetic_data, workdir), f"--config.train.num_steps={TARGET}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"from step {TARGET - 3}" in proc.stderr and "checkpoints_damaged" in proc.stderr
  damaged = os.listdir(os.path.join(workdir, checkpoint.DAMAGED_DIR))
  assert len(damaged) == 1 and damaged[0].startswith(f"{TARGET}-"), damaged
  _assert_bitwise_equal(_final_state(workdir, TARGET, synthetic_data), reference[1])


def test_a_diverging_run_stops_with_its_own_exit_code_and_the_sweep_skips_it(
    synthetic_data, tmp_path):
  workdir = str(tmp_path / "diverged")
  proc = run_cli(*_common(synthetic_data, workdir), "--config.train.learning_rate=1e30",
                 "--config.train.num_steps=50", "--config.train.max_nonfinite_steps=3",
                 "--config.train.log_every_steps=1")
  assert proc.returncode == 78, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("cfgdiff: error: training diverged: 3 non-finite updates"), last
  record = json.loads(_text(os.path.join(workdir, train.DIVERGED_FILE)))
  assert record["nonfinite_in_a_row"] == 3 and record["step"] < 50
  for step in checkpoint.saved_steps(workdir):  # what was saved holds finite numbers
    state = _final_state(workdir, step, synthetic_data)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))

  swept = run_cli(*_common(synthetic_data, workdir), "--mode=sweep")
  assert swept.returncode == 2, swept.stderr[-3000:]
  assert "skipping diverged: its training diverged" in swept.stderr
  assert "nothing to evaluate" in swept.stderr.strip().splitlines()[-1]
  assert not os.path.exists(os.path.join(workdir, "sweep", "results.csv"))


@pytest.mark.parametrize("change", ["seed=1", "train.batch_size=16", "diffusion.p_uncond=0.3"])
def test_resuming_under_a_changed_trajectory_is_refused_with_the_fix(
    reference, tiny_config, tmp_path, change):
  workdir = _copy(reference[0], tmp_path)
  key, value = change.split("=")
  section = tiny_config
  *parents, leaf = key.split(".")
  for name in parents:
    section = section[name]
  was = section[leaf]
  section[leaf] = type(was)(value)
  with pytest.raises(resume.ResumeError, match=f"resume with --config.{key}={was}, or pass "
                                               "--allow_config_change"):
    train.train(tiny_config, workdir)
  assert checkpoint.saved_steps(workdir) == [3, 6, 9, 12]
  assert not os.path.exists(os.path.join(workdir, resume.HISTORY_FILE))


def test_resuming_on_other_data_is_refused(reference, tiny_config, tmp_path):
  workdir = _copy(reference[0], tmp_path)
  tiny_config.data.path = make_synthetic_dataset(str(tmp_path / "other"), n=200)
  with pytest.raises(resume.ResumeError, match="the training data changed .* 256 examples"):
    train.train(tiny_config, workdir)


def test_an_allowed_change_is_recorded_and_training_goes_on(reference, synthetic_data,
                                                            tmp_path):
  workdir = _copy(reference[0], tmp_path)
  proc = run_cli(*_common(synthetic_data, workdir), "--allow_config_change",
                 "--config.seed=7", f"--config.train.num_steps={TARGET + 1}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  (entry,) = [json.loads(line) for line in
              _text(os.path.join(workdir, resume.HISTORY_FILE)).splitlines()]
  assert entry["resumed_from_step"] == TARGET and entry["allowed_by_flag"]
  assert {"key": "seed", "was": 0, "now": 7} in entry["changes"]
  assert json.loads(_text(os.path.join(workdir, resume.CONFIG_FILE)))["seed"] == 7
  assert checkpoint.saved_steps(workdir)[-1] == TARGET + 1
