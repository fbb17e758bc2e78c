#!/usr/bin/env python3
"""Stand-ins for sbatch, srun, scontrol and scancel: a one-node SLURM on this machine.

State lives in STANDIN_SLURM_DIR/jobs/ID/. `sbatch [--nodes=N] [--ntasks-per-node=K]
SCRIPT ARGS` reads the script's #SBATCH lines (command-line options win), gives the job
the environment SLURM gives a batch job, and runs it in the background, its output
appended to --output. `srun CMD` starts SLURM_NTASKS copies of CMD with SLURM_PROCID /
SLURM_LOCALID / SLURM_STEP_NODELIST set (what JAX's SLURM cluster detection reads),
forwards SIGTERM to them and exits with the highest task status, as srun does.
`scontrol requeue ID` marks the job; when its script ends the job runs again from the
start with SLURM_RESTART_COUNT + 1. `scancel --signal=TERM ID` signals the job's tasks.
`jobs/ID/state` ends as 'COMPLETED 0' or 'FAILED N'; `jobs/ID/restarts` counts requeues.
"""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(os.environ.get("STANDIN_SLURM_DIR", "/tmp/standin_slurm"))


def _job(job_id) -> pathlib.Path:
  return ROOT / "jobs" / str(job_id)


def _options(args: list[str]) -> tuple[dict, list[str]]:
  options = {}
  while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    options[key] = value
  return options, args


def sbatch(args: list[str]) -> int:
  cli, rest = _options(list(args))
  script, script_args = rest[0], rest[1:]
  options = {}
  for line in pathlib.Path(script).read_text().splitlines():
    if line.startswith("#SBATCH --"):
      key, _, value = line[len("#SBATCH --"):].partition("=")
      options[key.strip()] = value.strip()
  options.update(cli)
  (ROOT / "jobs").mkdir(parents=True, exist_ok=True)
  job_id = random.randint(1000, 30000)
  while _job(job_id).exists():
    job_id += 1
  nodes, per_node = int(options.get("nodes", 1)), int(options.get("ntasks-per-node", 1))
  if nodes != 1:
    print("sbatch stand-in: one node only", file=sys.stderr)
    return 1
  _job(job_id).mkdir()
  output = options.get("output", "slurm-%j.out").replace("%j", str(job_id))
  spec = {"script": os.path.abspath(script), "args": script_args, "cwd": os.getcwd(),
          "output": os.path.abspath(output),
          "env": {"SLURM_JOB_ID": str(job_id), "SLURM_JOB_NAME": options.get("job-name", ""),
                  "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost",
                  "SLURM_NTASKS": str(nodes * per_node),
                  "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_SUBMIT_DIR": os.getcwd()}}
  (_job(job_id) / "spec.json").write_text(json.dumps(spec))
  subprocess.Popen([sys.executable, __file__, "_run", str(job_id)], start_new_session=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
  print(f"Submitted batch job {job_id}")
  return 0


def _run(job_id: str) -> int:
  job = _job(job_id)
  (job / "session").write_text(str(os.getpid()))  # started as a session leader: pgid
  spec = json.loads((job / "spec.json").read_text())
  restarts = 0
  while True:
    (job / "restarts").write_text(str(restarts))
    env = dict(os.environ, **spec["env"], SLURM_RESTART_COUNT=str(restarts))
    with open(spec["output"], "a") as out:
      code = subprocess.run(["bash", spec["script"], *spec["args"]], cwd=spec["cwd"], env=env,
                            stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    if (job / "requeue").exists():
      (job / "requeue").unlink()
      restarts += 1
      continue
    (job / "state").write_text("COMPLETED 0" if code == 0 else f"FAILED {code}")
    return 0


def srun(args: list[str]) -> int:
  _, command = _options(list(args))
  job_id, ntasks = os.environ["SLURM_JOB_ID"], int(os.environ["SLURM_NTASKS"])
  (_job(job_id) / "srun.pid").write_text(str(os.getpid()))
  tasks = []
  for i in range(ntasks):
    env = dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_NODEID="0",
               SLURM_STEP_NODELIST=os.environ["SLURM_JOB_NODELIST"],
               SLURM_STEP_NUM_NODES="1", SLURM_STEP_NUM_TASKS=str(ntasks))
    tasks.append(subprocess.Popen(command, env=env))
  forward = lambda signum, frame: [t.send_signal(signum) for t in tasks if t.poll() is None]
  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  codes = [t.wait() for t in tasks]
  (_job(job_id) / "srun.pid").unlink(missing_ok=True)
  return max(c if c >= 0 else 128 - c for c in codes)


def scontrol(args: list[str]) -> int:
  if args[:1] != ["requeue"]:
    print(f"scontrol stand-in: only 'requeue ID' is supported, got {args}", file=sys.stderr)
    return 1
  (_job(args[1]) / "requeue").write_text(str(time.time()))
  return 0


def scancel(args: list[str]) -> int:
  options, rest = _options(list(args))
  pid_file = _job(rest[0]) / "srun.pid"
  if not pid_file.exists():
    print(f"scancel stand-in: job {rest[0]} has no running step", file=sys.stderr)
    return 1
  os.kill(int(pid_file.read_text()), getattr(signal, "SIG" + options.get("signal", "TERM")))
  return 0


if __name__ == "__main__":
  command = sys.argv[1]
  handlers = {"sbatch": sbatch, "srun": srun, "scontrol": scontrol, "scancel": scancel,
              "_run": lambda a: _run(a[0])}
  sys.exit(handlers[command](sys.argv[2:]))
