"""Every command README gives is run by a test (or named here as one this machine cannot run),
and the ones no other test runs are run here: the main job (`make run`, a few steps), the
memory plan and the paper's sweep grids."""

import csv
import os
import re
import subprocess
import sys

from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# README command (its start) -> (test file that runs it, a string showing where it does).
RUN_BY = {
    "make run": ("tests/test_readme_commands.py", '"make", "-C", ROOT, "run"'),
    "make test": (".ci/run", "make test"),
    "make accel": ("tests/test_backend.py", '"accel"'),
    ".venv/bin/python -m cfgdiff.main": ("tests/test_readme_commands.py", '"make", "-C", ROOT'),
    ".venv/bin/python -m cfgdiff.prepare_imagenet64": ("tests/test_prepare_imagenet64.py",
                                                       '"-m", "cfgdiff.prepare_imagenet64"'),
    ".venv/bin/python -c \"import tensorflow_datasets as tfds; tfds.builder('imagenet2012'":
        ("tests/tfds_datasets.py", "download_and_prepare"),
    "CFGDIFF_REPO=https://github.com/YOU/cfgdiff.git launch/tpu_pod.sh":
        ("tests/test_rehearsal.py", "tpu_pod.sh"),
    "launch/tpu_pod.sh": ("tests/test_rehearsal.py", "tpu_pod.sh"),
    "launch/setup_worker.sh": ("tests/test_rehearsal.py", "setup_worker.sh"),
    "sbatch --nodes=4 launch/slurm_gpu.sbatch": ("tests/test_rehearsal.py", "slurm_gpu.sbatch"),
    "sbatch --nodes=1 launch/slurm_gpu.sbatch": ("tests/test_rehearsal.py", "slurm_gpu.sbatch"),
    # `python -m cfgdiff.main --multihost ...`: what launch/tpu_pod.sh starts on every worker.
    "python -m cfgdiff.main": ("tests/test_rehearsal.py", "tpu_pod.sh"),
    "python -m cfgdiff.memory_plan": ("tests/test_readme_commands.py", '"cfgdiff.memory_plan"'),
    "python -m experiments.sweeps": ("tests/test_readme_commands.py", '"experiments.sweeps"'),
    "python -m benchmarks.accelerator_check": ("tests/test_accelerator_check.py",
                                               "benchmarks.accelerator_check"),
    "python -m benchmarks.page": ("tests/test_benchmarks_page.py", "page.render"),
}
# Commands only another machine can run: what stands in for them here.
NOT_HERE = {
    "make PYTHON=python3.11 run": "a TPU VM; `make run` is run here",
    "sudo apt-get install -y python3.11 python3.11-venv": "a TPU VM's Ubuntu 22.04",
    "DIR=/mnt/disks/data/tfds": "a variable the next two commands use",
}


def readme_commands() -> list[str]:
  """The commands of README's bash blocks (continuation lines joined, comments dropped) and
  its inline `python -m ...` commands."""
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      command = re.sub(r"(^|\s)#.*", "", line).strip()  # a comment starts a word
      if command:
        commands.append(re.sub(r"\s+", " ", command))
  commands += re.findall(r"`(python -m [\w.]+)[^`]*`", text)
  return commands


def _covered(command: str) -> bool:
  return any(command.startswith(start) for start in [*RUN_BY, *NOT_HERE])


def test_every_readme_command_is_run_by_a_test_or_named_as_another_machines():
  commands = readme_commands()
  assert any(c.startswith("make run") for c in commands) and len(commands) >= 15, commands
  missing = [c for c in commands if not _covered(c)]
  assert not missing, f"README commands no test runs (add one, and a line to RUN_BY): {missing}"
  for start, (path, evidence) in RUN_BY.items():
    with open(os.path.join(ROOT, path)) as f:
      assert evidence in f.read(), f"{path} does not run {start!r} (no {evidence!r} in it)"


def test_readme_commands_are_found_with_their_continuations():
  assert _covered("launch/tpu_pod.sh EVAL_TPU ZONE gs://B/t experiments/imagenet64.py")
  assert not _covered("python -m cfgdiff.unknown")


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu")
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)


def test_make_run_trains_and_sweeps_the_main_job_config(tmp_path):
  """README's main job, the target itself on its real config, cut to a few steps."""
  workdir = tmp_path / "main_job"
  args = " ".join([
      "--config.train.num_steps=4", "--config.train.checkpoint_every_steps=4",
      "--config.train.log_every_steps=2", "--config.train.kernel_gradient=xla",
      "--config.sweep.num_samples=20", "--config.sweep.num_steps=4",
      "--config.sweep.guidance_weights='(0.0,2.0)'"])
  proc = _run(["make", "-C", ROOT, "run", f"WORKDIR={workdir}", f"ARGS={args}",
               f"PYTHON={sys.executable}"], timeout=1200)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert "experiments/fashion_mnist.py" in proc.stdout  # make echoes the README's CLI
  with open(workdir / "sweep" / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [float(r["w"]) for r in rows] == [0.0, 2.0] and {r["step"] for r in rows} == {"4"}
  assert all(float(r["fid"]) > 0 and 0 <= float(r["accuracy"]) <= 1 for r in rows)
  assert (workdir / "sweep" / "results.md").exists()
  assert (workdir / "sweep" / "tradeoff.png").exists()


def test_memory_plan_prints_the_paper_config_on_every_chip():
  proc = _run([sys.executable, "-m", "cfgdiff.memory_plan",
               "--config=experiments/imagenet64.py", "--num_chips=64"], timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert "batch 2048 over 64 chips" in lines[0]
  a100 = next(line for line in lines if line.startswith("a100-40gb"))
  # docs/cluster.md's table: the paper's 32 per chip do not fit; micro-batches of 16 per chip.
  assert a100.split()[-1] == f"microbatch_size={16 * 64}"


def test_the_paper_sweep_grids_print_one_training_command_per_p_uncond(tmp_path):
  proc = _run([sys.executable, "-m", "experiments.sweeps", "table1",
               f"--workdir={tmp_path}"], timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  trains = [line for line in proc.stdout.splitlines()
            if "cfgdiff.main" in line and "--mode=sweep" not in line]
  p_uncond = sorted(float(m) for line in trains
                    for m in re.findall(r"p_uncond=([\d.]+)", line))
  assert p_uncond == [0.1, 0.2, 0.5], proc.stdout  # the paper's Table 1 rows
  assert any("--mode=sweep" in line for line in proc.stdout.splitlines())
