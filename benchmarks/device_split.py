"""What splitting the CPU into XLA devices inside one process costs, against the bound.

  python -m benchmarks.device_split [--model fashion_mnist] [--batch 16] [--steps 15]
      [--no-write]

Times the forward loss, its value-and-gradient and the whole training step (the paper's
loss, Adam, EMA) of `cfgdiff.train` at one global batch, split three ways:

- one process with one XLA device per core (what `cfgdiff.main` runs on a CPU host);
- one process pinned to one core, one device, batch / cores: the per-core cost alone;
- one such pinned process per core, all at once: the per-core cost when the cores share
  memory and caches but nothing else. The processes are independent (no gradient
  all-reduce), so this is a bound on what the device split could reach, not a way to train.

Each variant runs in fresh processes (the device count is fixed at JAX import); medians of
``--steps`` calls after warm-up, all with the convolution kernel gradient the one-process
run's training picks (train.kernel_gradient = "auto"). Records one table in benchmarks/results.jsonl
with the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks import common


def worker(variant: dict) -> dict:
  """Median milliseconds of forward loss, value-and-gradient and train step; own process."""
  if variant.get("core") is not None:
    os.sched_setaffinity(0, {variant["core"]})  # before JAX starts its threads
  import time

  import jax
  import numpy as np

  from benchmarks.vs_torch import _config
  from cfgdiff import diffusion

  config = _config(variant["model"])
  config.train.batch_size = variant["batch"]
  config.train.kernel_gradient = variant.get("kernel_gradient", "auto")
  dc = config.diffusion
  mesh, model, optimizer, state, images = common.train_setup(config)
  # The kernel gradient the real training picks ("auto" times both here), for all three calls.
  step, taps = common.training_step(config, model, optimizer, mesh, state, images)
  model = model.clone(kernel_grad_taps=taps)

  def loss(params, batch):
    noised = diffusion.noise_batch(
        jax.random.PRNGKey(0), batch["image"], batch["label"], p_uncond=dc.p_uncond,
        num_classes=config.data.num_classes, logsnr_min=dc.logsnr_min,
        logsnr_max=dc.logsnr_max)
    eps_pred = model.apply({"params": params}, noised["z"], noised["logsnr"],
                           noised["label"], train=True)
    return diffusion.eps_loss(eps_pred, noised["eps"])

  forward = jax.jit(loss).lower(state.params, images).compile()
  value_and_grad = jax.jit(jax.value_and_grad(loss)).lower(state.params, images).compile()

  def train_once():
    nonlocal state
    state, metrics = step(state, images)
    jax.block_until_ready(metrics)

  calls = {"forward": lambda: jax.block_until_ready(forward(state.params, images)),
           "value_and_grad": lambda: jax.block_until_ready(value_and_grad(state.params, images)),
           "step": train_once}
  times = {name: [] for name in calls}
  for repeat in range(variant["steps"] + 2):
    for name, call in calls.items():  # interleaved, so drifts of the machine hit all three
      start = time.perf_counter()
      call()
      if repeat >= 2:
        times[name].append(time.perf_counter() - start)
  return dict({name: 1e3 * float(np.median(t)) for name, t in times.items()},
              kernel_gradient="taps" if taps else "xla")


KERNEL_GRADIENTS = {"taps": "conv.py's tap products", "xla": "XLA's own"}


def _start(variant: dict, devices: int) -> subprocess.Popen:
  env = common.worker_env(devices, "--xla_cpu_multi_thread_eigen=false")
  return subprocess.Popen([sys.executable, "-m", "benchmarks.device_split", "--worker",
                           json.dumps(variant)], cwd=common.ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _results(processes: list[subprocess.Popen]) -> list[dict]:
  out = []
  for process in processes:
    stdout, stderr = process.communicate()
    if process.returncode != 0:
      raise RuntimeError(f"worker failed:\n{stderr[-3000:]}")
    out.append(json.loads(stdout.strip().splitlines()[-1]))
  return out


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--worker", help="internal: run one JSON variant and print JSON")
  parser.add_argument("--model", default="fashion_mnist", help="fashion_mnist or reference")
  parser.add_argument("--batch", type=int, default=16, help="global batch")
  parser.add_argument("--steps", type=int, default=15, help="timed calls (median kept)")
  parser.add_argument("--no-write", action="store_true", help="print only")
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(json.loads(args.worker))))
    return

  allowed = sorted(os.sched_getaffinity(0))  # the cores this process may use, not always 0..n-1
  cores = len(allowed)
  if args.batch % cores:
    parser.error(f"--batch {args.batch} must divide over the {cores} cores")
  split = _results([_start(dict(model=args.model, batch=args.batch, steps=args.steps), cores)])
  # The pinned processes use the kernel gradient the split process's training picked.
  per_core = dict(model=args.model, batch=args.batch // cores, steps=args.steps,
                  kernel_gradient=split[0]["kernel_gradient"])
  variants = {
      f"one process, {cores} devices, batch {args.batch}": split,
      f"one process pinned to one core, batch {args.batch // cores}, alone":
          _results([_start(dict(per_core, core=allowed[0]), 1)]),
      f"{cores} pinned processes at once, batch {args.batch // cores} each (no all-reduce)":
          _results([_start(dict(per_core, core=core), 1) for core in allowed]),
  }
  header = ["variant", "forward loss (ms)", "value and gradient (ms)", "training step (ms)",
            f"images/s over {cores} cores"]
  rows = []
  for name, results in variants.items():
    mean = {key: sum(r[key] for r in results) / len(results)
            for key in ("forward", "value_and_grad", "step")}
    rows.append([name, f"{mean['forward']:.1f}", f"{mean['value_and_grad']:.1f}",
                 f"{mean['step']:.1f}", f"{1e3 * args.batch / mean['step']:.1f}"])
    print(" | ".join(rows[-1]), flush=True)
  if not args.no_write:
    common.record(
        f"Device split: {args.model} training step, one process against pinned processes "
        f"(kernel gradient: {KERNEL_GRADIENTS[split[0]['kernel_gradient']]})",
        ("python -m benchmarks.device_split " + " ".join(sys.argv[1:])).strip(), header, rows)


if __name__ == "__main__":
  main()
