"""The training step under the C library's malloc and under jemalloc, JAX and PyTorch.

  python -m benchmarks.malloc [--models fashion_mnist,reference] [--rounds 2] [--steps 10]
      [--no-write]

`cfgdiff.main` preloads jemalloc on CPU hosts (cfgdiff/allocator.py). This measures why:
for each allocator, the JAX training step (both kernel gradients, one XLA device per core)
and PyTorch eager's (one thread per core, `benchmarks/torch_unet.py`, same network and
weights) with the minor page faults and the kernel (system) CPU time per step, from
getrusage over ``--steps`` steps after warm-up. Every variant is a fresh process; the
allocators alternate for ``--rounds`` rounds (the two JAX steps swap order each round) and
the fastest round is kept. Records one
table in benchmarks/results.jsonl with the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

from benchmarks import common

ALLOCATORS = ("system", "jemalloc")


def _per_step(run_steps, steps: int) -> dict:
  """Wall seconds, minor faults and system CPU seconds per step over ``steps`` steps."""
  run_steps(2)  # warm-up
  before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  run_steps(steps)
  wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
  return {"s": wall / steps, "faults": (after.ru_minflt - before.ru_minflt) / steps,
          "system_s": (after.ru_stime - before.ru_stime) / steps}


def worker(variant: dict) -> dict:
  """Per-step numbers of each training step in this process (its allocator is fixed)."""
  from benchmarks.vs_torch import _config
  from cfgdiff import allocator
  config = _config(variant["model"])
  steps = variant["steps"]
  if variant["framework"] == "torch":
    import torch

    from benchmarks.torch_unet import adam_train_step
    torch.set_num_threads(os.cpu_count() or 1)
    size = config.data.image_size
    step = adam_train_step(common.torch_network(config), config.train.batch_size, (1, size, size),
                           config.data.num_classes, config.diffusion.p_uncond)
    return {"torch": _per_step(lambda n: [step() for _ in range(n)], steps),
            "malloc": allocator.in_use()}

  import jax

  from cfgdiff import train_step
  mesh, model, optimizer, state, images = common.train_setup(config)
  out = {"malloc": allocator.in_use()}
  order = (("taps", True), ("xla", False))
  for name, taps in order[::-1] if variant["reverse"] else order:  # alternates across rounds
    compiled = train_step.compile_train_step(config, model.clone(kernel_grad_taps=taps), optimizer,
                                        mesh).lower(state, images).compile()

    def run_steps(n, compiled=compiled):
      nonlocal state
      for _ in range(n):
        state, metrics = compiled(state, images)
      jax.block_until_ready(metrics)
    out[name] = _per_step(run_steps, steps)
  return out


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--worker", help="internal: run one JSON variant and print JSON")
  parser.add_argument("--models", default="fashion_mnist,reference")
  parser.add_argument("--rounds", type=int, default=2, help="alternations (fastest kept)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
  parser.add_argument("--no-write", action="store_true", help="print only")
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(json.loads(args.worker))))
    return

  from benchmarks.vs_torch import MODELS
  from cfgdiff import allocator
  if allocator.find_jemalloc() is None:
    parser.error(f"jemalloc is not installed ({allocator.INSTALL_HINT})")
  cores = os.cpu_count() or 1
  header = ["network, batch", "training step", "allocator", "step (s)",
            "minor page faults per step", "system CPU per step (s, all threads)",
            "speed over the C library's malloc"]
  rows = []
  for model in args.models.split(","):
    best: dict = {}
    for round_index in range(args.rounds):
      for framework in ("jax", "torch"):
        for malloc in ALLOCATORS:
          variant = dict(model=model, steps=args.steps, framework=framework,
                         reverse=round_index % 2 == 1)
          result = common.run_variant("benchmarks.malloc", variant, cores,
                                      "--xla_cpu_multi_thread_eigen=false", malloc=malloc)
          del result["malloc"]  # run_variant checked it is the one asked for
          for name, numbers in result.items():
            key = (name, malloc)
            if key not in best or numbers["s"] < best[key]["s"]:
              best[key] = numbers
    labels = {"taps": "JAX, conv.py's tap products", "xla": "JAX, XLA's kernel gradient",
              "torch": "PyTorch eager"}
    for name, label in labels.items():
      for malloc in ALLOCATORS:
        n = best[(name, malloc)]
        rows.append([f"{model}, {MODELS[model][1]}", label,
                     "C library (glibc)" if malloc == "system" else "jemalloc",
                     f"{n['s']:.3f}", f"{n['faults']:.0f}", f"{n['system_s']:.3f}",
                     f"{best[(name, 'system')]['s'] / n['s']:.2f}"])
        print(" | ".join(rows[-1]), flush=True)
  if not args.no_write:
    common.record(
        "Memory allocator: the training step under glibc's malloc and under jemalloc",
        f"python -m benchmarks.malloc --models {args.models} --rounds {args.rounds} "
        f"--steps {args.steps}", header, rows)


if __name__ == "__main__":
  main()
