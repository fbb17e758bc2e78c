"""The launchers' host set-up: a Python >= 3.11 found or installed the way a stock
Ubuntu 22.04 TPU VM needs it, and a clear refusal of an older Python; the SLURM script's
requeue decision on cfgdiff's exit status."""

import os
import shutil
import subprocess
import sys

import pytest

from cfgdiff import preemption
from tests.conftest import ROOT

SETUP = os.path.join(ROOT, "launch", "setup_worker.sh")


def _fake_bin(tmp_path, version: str) -> str:
  """A bin folder whose python3 is a stock Ubuntu 22.04 Python 3.10 (a stand-in)."""
  folder = tmp_path / "bin"
  folder.mkdir()
  fake = folder / "python3"
  fake.write_text(f"#!/bin/sh\n[ \"$1\" = --version ] && echo 'Python {version}' && exit 0\n"
                  "exit 1\n")
  fake.chmod(0o755)
  return str(folder)


def _path_without_python(folder: str, tmp_path) -> str:
  """PATH with the fake folder first and, beside it, only the tools the script uses: no
  python3.1x of this host is reachable (it may well have one in /usr/bin)."""
  tools = tmp_path / "tools"
  tools.mkdir()
  for tool in ("dirname", "id", "ln", "cat"):
    os.symlink(shutil.which(tool), tools / tool)
  return f"{folder}:{tools}"


def test_python_310_image_gets_python311_from_apt(tmp_path):
  folder = _fake_bin(tmp_path, "3.10.12")
  log = tmp_path / "apt.log"
  # Stand-ins for sudo and apt-get: the install puts a real Python >= 3.11 on PATH.
  (tmp_path / "bin" / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
  (tmp_path / "bin" / "apt-get").write_text(
      f"#!/bin/sh\necho \"$@\" >> {log}\n"
      f"[ \"$1\" = install ] && ln -sf {sys.executable} {folder}/python3.11\nexit 0\n")
  for name in ("sudo", "apt-get"):
    (tmp_path / "bin" / name).chmod(0o755)
  env = dict(os.environ, PATH=_path_without_python(folder, tmp_path))
  proc = subprocess.run([shutil.which("bash"), SETUP, "--python-only"], env=env,
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr
  assert "needs Python >= 3.11" in proc.stdout and "python3.11" in log.read_text()
  assert f"{folder}/python3.11" in proc.stdout


def test_python3_at_least_311_is_used_as_it_is(tmp_path):
  folder = tmp_path / "bin"
  folder.mkdir()
  os.symlink(sys.executable, folder / "python3")
  env = dict(os.environ, PATH=f"{folder}:/usr/bin:/bin")
  proc = subprocess.run(["bash", SETUP, "--python-only"], env=env, capture_output=True,
                        text=True, check=True)
  assert f"{folder}/python3 (Python 3." in proc.stdout


def test_cfgdiff_refuses_an_old_python_in_one_line():
  proc = subprocess.run(
      [sys.executable, "-c", "import sys; sys.version_info = (3, 10, 12, 'final', 0); "
       "import cfgdiff"], cwd=ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("ImportError: cfgdiff needs Python >= 3.11") and "apt-get" in last


@pytest.mark.parametrize("code,restart,requeued", [
    (preemption.EXIT_PREEMPTED, 9, True), (preemption.EXIT_STALLED, 0, True),
    (preemption.EXIT_STALLED, 5, False), (preemption.EXIT_LOCK_LOST, 0, False),
    (preemption.EXIT_DIVERGED, 0, False), (1, 0, False)])
def test_slurm_script_requeues_preemption_and_stalls_only(tmp_path, code, restart, requeued):
  """slurm_gpu.sbatch's decision on cfgdiff's exit status (preemption.py), with stand-ins
  for srun (exiting as the job would) and scontrol (recording the requeue)."""
  bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(f"#!/bin/sh\nexit {code}\n")
  (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
  for name in ("srun", "scontrol"):
    (bin_dir / name).chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="31",
             SLURM_RESTART_COUNT=str(restart))
  proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm_gpu.sbatch"),
                         str(tmp_path / "w")], cwd=ROOT, env=env, capture_output=True,
                        text=True, check=False)
  assert proc.returncode == (0 if requeued else code), proc.stdout + proc.stderr
  assert (calls.read_text() if calls.exists() else "") == ("requeue 31\n" if requeued else "")
  if code != 1 and not requeued:
    assert "not requeued" in proc.stdout
