"""The paper's ImageNet runs rehearsed end to end on this CPU, as a pod or SLURM user runs
them: the same launchers, configs and CLI, with stand-ins for what only a cluster has.

- Data: `imagenet_resized/64x64` and `imagenet2012` built here by TFDS itself into
  ArrayRecord files (tests/tfds_datasets.py), read through the training code.
- TPU pod: `launch/tpu_pod.sh` against a stand-in `gcloud` (tests/standins/gcloud) that
  runs each worker's command as local processes with its own HOME: 2 workers x 2 CPU
  devices train the ImageNet-64 config (shrunk by --config overrides), one worker gets
  SIGTERM (a maintenance event), both save the same step and exit 75, the same command
  resumes them to the end; meanwhile a `--mode=sweep` job on a second stand-in slice
  polls the workdir and writes FID and Inception Score rows for checkpoints that
  training keeps deleting (keep_checkpoints=1).
- SLURM: `launch/slurm_gpu.sbatch` under stand-in sbatch/srun/scontrol/scancel
  (tests/standins/slurm.py; JAX's own SLURM cluster detection does the rest): the
  ImageNet-128 config on ImageNet 2012 JPEGs, SIGTERM before the time limit, the job
  requeueing itself, a double submit refused while the requeued run lives, the resume.

What a real slice adds and is not run here: TPU detection through the metadata server,
libtpu, GCS workdirs, real Inception weights (a random-weight file in pytorch-fid's
layout stands in). `make rehearse` runs this module alone and prints its log.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cfgdiff import checkpoint
from tests import tfds_datasets
from tests.conftest import ROOT, free_port, wait_for, xla_flags

pytestmark = pytest.mark.rehearsal

STANDINS = os.path.join(ROOT, "tests", "standins")
TRAIN_STEPS = 10
# The paper configs, shrunk in width, depth, batch and steps only. ADM's middle block
# always attends, so the 128x128 model keeps 4 levels (128 -> 16) to keep that cheap.
SHRINK = ["--config.model.ch=16", "--config.model.num_res_blocks=1",
          "--config.train.batch_size=8",
          f"--config.train.num_steps={TRAIN_STEPS}", "--config.train.checkpoint_every_steps=2",
          "--config.train.keep_checkpoints=1", "--config.train.log_every_steps=1",
          "--config.runtime.cpu_devices=2",
          # One grain worker per process (the configs' 4 and 8 are for a pod host's cores):
          # the worker path is exercised without eight process start-ups on two cores.
          "--config.data.num_workers=1"]
SWEEP = ["--mode=sweep", "--config.sweep.poll_seconds=2", "--config.sweep.num_samples=10",
         "--config.sweep.num_steps=4", "--config.sweep.guidance_weights=(0.0,3.0)",
         "--config.sample.batch_size=8", "--config.runtime.cpu_devices=1"]


def log(message: str) -> None:
  """The rehearsal's own log, shown by `make rehearse` (pytest -s) and kept in README."""
  print(f"[rehearsal {time.strftime('%H:%M:%S')}] {message}", flush=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> str:
  """This working tree as a git repository: what CFGDIFF_REPO points the workers at."""
  path = tmp_path_factory.mktemp("repo") / "cfgdiff"
  tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
  for name in tracked:
    if os.path.isfile(os.path.join(ROOT, name)):
      (path / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(os.path.join(ROOT, name), path / name)
  git = ["git", "-c", "user.name=rehearsal", "-c", "user.email=rehearsal@localhost"]
  for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "snapshot"]):
    subprocess.run(git + command, cwd=path, check=True)
  return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  """Both datasets as a user prepares them on a VM, in ArrayRecord, built by TFDS."""
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  path = str(tmp_path_factory.mktemp("tensorflow_datasets"))
  start = time.time()
  tfds_datasets.build_imagenet_resized64(path, num_train=32, num_val=10)
  tfds_datasets.build_imagenet2012(path, num_classes=4, per_class=6, num_val=8)
  formats = {json.loads(p.read_text()).get("fileFormat") for p in
             pathlib.Path(path).rglob("dataset_info.json")}
  log(f"built imagenet_resized/64x64 and imagenet2012 in {path} as {formats} "
      f"({time.time() - start:.0f} s)")
  assert formats == {"array_record"}, formats
  return path


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> str:
  """A pytorch-fid-layout Inception file (pool3 and the 1008 logits) with random
  weights: the real file cannot be downloaded here."""
  from tests.test_inception import write_random_pytorch_fid_weights
  path = str(tmp_path_factory.mktemp("weights") / "pt_inception-random.pth")
  write_random_pytorch_fid_weights(path, seed=0)
  return path


@pytest.fixture(autouse=True)
def stop_leftover_jobs(tmp_path):
  """A failed assertion must not leave training processes behind: every stand-in job
  runs in its own session, ended here whatever happened."""
  yield
  for pid_file in [*tmp_path.rglob("cfgdiff_jobs/*/pid"), *tmp_path.rglob("jobs/*/session")]:
    try:
      os.killpg(os.getpgid(int(pid_file.read_text())), signal.SIGKILL)
    except (ProcessLookupError, ValueError, PermissionError):
      pass


def cluster_env(tmp_path: pathlib.Path) -> dict:
  env = dict(os.environ, PATH=f"{STANDINS}:{os.environ['PATH']}", TF_CPP_MIN_LOG_LEVEL="3",
             STANDIN_TPU_ROOT=str(tmp_path / "tpu"), STANDIN_SLURM_DIR=str(tmp_path / "slurm"),
             CFGDIFF_VENV=sys.prefix, CFGDIFF_JAX="jax", XLA_FLAGS=xla_flags())
  return env


def make_slice(env: dict, name: str, workers: int) -> pathlib.Path:
  folder = pathlib.Path(env["STANDIN_TPU_ROOT"], name)
  folder.mkdir(parents=True)
  (folder / "workers").write_text(str(workers))
  (folder / "port").write_text(str(free_port()))
  return folder


def worker_job(folder: pathlib.Path, worker: int, job: str) -> pathlib.Path:
  return folder / f"worker_{worker}" / "cfgdiff_jobs" / job


def run(command: list[str], cwd: str, env: dict, timeout: float = 900):
  proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)
  assert proc.returncode == 0, f"{command} exited {proc.returncode}:\n{proc.stdout[-3000:]}" \
      f"\n{proc.stderr[-3000:]}"
  return proc


def test_tpu_pod_train_preempt_resume_with_polling_sweep(repo, data_dir, inception_file,
                                                         tmp_path):
  env = cluster_env(tmp_path) | {"CFGDIFF_REPO": repo}
  train_slice, eval_slice = make_slice(env, "train-v4-16", 2), make_slice(env, "eval-v4-8", 2)
  workdir = str(tmp_path / "gcs" / "imagenet64_p0.1")
  launch = ["bash", os.path.join(repo, "launch", "tpu_pod.sh")]
  train_args = [*launch, "train-v4-16", "us-central2-b", workdir, "experiments/imagenet64.py",
                f"--config.data.path={data_dir}", "--config.model.head_channels=16",
                "--config.model.ch_mult=(1,2)", *SHRINK]
  start = time.time()
  run(train_args, repo, env)
  log("tpu_pod.sh started training on 2 stand-in workers x 2 CPU devices")
  sweep_args = [*launch, "eval-v4-8", "us-central2-b", workdir, "experiments/imagenet64.py",
                f"--config.data.path={data_dir}", *SWEEP,
                f"--config.sweep.inception_weights={inception_file}",
                f"--config.sweep.cache_dir={tmp_path / 'gcs' / 'cache'}"]
  run(sweep_args, repo, env)
  log("tpu_pod.sh started the polling sweep on a second stand-in slice (2 workers)")

  wait_for(lambda: any(s >= 4 for s in checkpoint.saved_steps(workdir)), 900,
           "a checkpoint at step >= 4")
  log(f"checkpoints {checkpoint.saved_steps(workdir)}; SIGTERM to worker 1 (maintenance event)")
  run(["gcloud", "compute", "tpus", "tpu-vm", "ssh", "train-v4-16", "--zone",
       "us-central2-b", "--worker=1", "--command", "~/cfgdiff/launch/detached.sh signal train"],
      repo, env)
  codes = [wait_for(lambda i=i: (worker_job(train_slice, i, "train") / "exit_code").exists()
                    and (worker_job(train_slice, i, "train") / "exit_code").read_text().strip(),
                    300, f"worker {i} to stop") for i in range(2)]
  logs = [(worker_job(train_slice, i, "train") / "log").read_text() for i in range(2)]
  stopped = [int(text.split("Preempted (SIGTERM) at step ")[1].split(":")[0]) for text in logs]
  log(f"workers exited {codes}, both saved step {stopped}")
  assert codes == ["75", "75"] and stopped[0] == stopped[1] < TRAIN_STEPS, (codes, stopped)

  resumed = run(train_args, repo, env | {"CFGDIFF_WAIT": "1"})
  logs = [(worker_job(train_slice, i, "train") / "log").read_text() for i in range(2)]
  assert all(f"from step {stopped[0]}" in text for text in logs), logs[0][-2000:]
  # The first run timed both kernel gradients across the two processes; the resume reused it.
  assert any("Kernel gradient: " in text and ", as saved in " in text for text in logs)
  assert checkpoint.saved_steps(workdir) == [TRAIN_STEPS]
  log(f"the same tpu_pod.sh command resumed from step {stopped[0]} to {TRAIN_STEPS} "
      f"(exit 0); training took {time.time() - start:.0f} s in all")
  del resumed

  run(["gcloud", "compute", "tpus", "tpu-vm", "ssh", "eval-v4-8", "--zone", "us-central2-b",
       "--worker=all", "--command", "~/cfgdiff/launch/detached.sh wait sweep"], repo, env,
      timeout=900)
  sweep_log = (worker_job(eval_slice, 0, "sweep") / "log").read_text()
  with open(os.path.join(workdir, "sweep", "results.csv")) as f:
    rows = list(csv.DictReader(f))
  steps = sorted({int(r["step"]) for r in rows})
  log(f"the sweep ended by itself after the final step; it evaluated steps {steps}")
  for r in rows:
    log(f"  step {r['step']} w={r['w']}: FID {float(r['fid']):.1f}, "
        f"IS {float(r['is_mean']):.3f}, feature net {r['feature_net']}")
  assert steps[-1] == TRAIN_STEPS and len(rows) == 2 * len(steps)
  assert all(math.isfinite(float(r["fid"])) and math.isfinite(float(r["is_mean"]))
             for r in rows), rows
  assert "2 process(es)" in sweep_log, sweep_log[-3000:]
  at = sweep_log.find("Traceback")
  assert at < 0, f"a traceback in the sweep's log:\n{sweep_log[max(0, at - 1500):at + 1500]}"


def test_slurm_double_submit_refused_then_sigterm_requeue_resume(repo, data_dir, tmp_path):
  env = cluster_env(tmp_path)
  run(["bash", "launch/setup_worker.sh", "jax"], repo, env)  # .venv -> the prepared env
  workdir = str(tmp_path / "shared" / "imagenet128")
  slurm = pathlib.Path(env["STANDIN_SLURM_DIR"], "jobs")
  submit = ["sbatch", "--ntasks-per-node=2", "launch/slurm_gpu.sbatch", workdir,
            "experiments/imagenet128.py", f"--config.data.path={data_dir}",
            "--config.model.ch_mult=(1,1,1,2)", *SHRINK,
            # The TPU rehearsal times the kernel gradients across processes; here that
            # would add 80 s of compiling and nothing new.
            "--config.train.kernel_gradient=taps"]

  def job_of(proc) -> str:
    return proc.stdout.split("Submitted batch job ")[1].split()[0]

  def output(job: str) -> str:
    return pathlib.Path(repo, f"cfgdiff-{job}.out").read_text()

  def lock_token() -> str | None:
    try:
      return json.loads(pathlib.Path(workdir, "train.lock").read_text())["token"]
    except (FileNotFoundError, ValueError, KeyError):
      return None

  first = job_of(run(submit, repo, env))
  log(f"sbatch: job {first}, 2 tasks x 2 CPU devices, ImageNet-128 config on imagenet2012")
  wait_for(lambda: checkpoint.saved_steps(workdir), 900, "the first checkpoint")
  first_run = lock_token()
  run(["scancel", "--signal=TERM", first], repo, env)
  log(f"scancel --signal=TERM {first} (what --signal=TERM@120 sends before the time limit)")
  # The job saves, exits 75 and requeues itself; its second run takes the workdir again
  # and, with no compilation cache across processes, compiles for a minute or more.
  wait_for(lambda: (slurm / first / "restarts").read_text() == "1"
           and lock_token() not in (None, first_run), 600, "the requeued run to start")
  live = lock_token()

  # A second job on the same workdir while the requeued one lives: refused, nothing touched.
  second = job_of(run(submit, repo, env))
  state = wait_for(lambda: (slurm / second / "state").exists() and
                   (slurm / second / "state").read_text(), 300, "the double submit to end")
  refusals = [line for line in output(second).splitlines() if line.startswith("cfgdiff: error:")]
  detailed = [line for line in refusals if "being trained by a live job" in line]
  log(f"double submit: job {second} ended {state}: {(detailed or refusals)[0]}")
  assert state == "FAILED 2" and len(refusals) == 2, output(second)[-3000:]
  assert detailed, refusals
  assert not (slurm / first / "state").exists(), "the requeued job must still be running"
  assert lock_token() == live

  state = wait_for(lambda: (slurm / first / "state").exists() and
                   (slurm / first / "state").read_text(), 900, "the requeued job to end")
  text = output(first)
  stopped = int(text.split("Preempted (SIGTERM) at step ")[1].split(":")[0])
  restarts = int((slurm / first / "restarts").read_text())
  log(f"job {first}: saved step {stopped}, requeued itself (restart {restarts}), resumed, "
      f"ended {state} at step {checkpoint.saved_steps(workdir)}")
  assert state == "COMPLETED 0" and restarts == 1
  assert f"requeueing job {first}" in text and f"from step {stopped}" in text
  assert checkpoint.saved_steps(workdir) == [TRAIN_STEPS]
  assert not pathlib.Path(workdir, "train.lock").exists()
