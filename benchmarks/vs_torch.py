"""JAX (cfgdiff) against PyTorch eager on this CPU, in one invocation, as ratios.

  python -m benchmarks.vs_torch [--models reference,fashion_mnist] [--steps 6] [--no-write]

For each network: a training step (the paper's loss, Adam) with conv.py's tap-product kernel
gradient and with XLA's own (train.kernel_gradient="auto" trains with the faster, timed the
same way), the faster again against the same step with XLA's SPMD gradient all-reduce
instead of the flat one (train_step.flat_allreduce_applies), and one guided evaluation (two
passes of B); JAX jitted with one XLA device per core, PyTorch eager with one thread per
core, both on the same network with the same initial weights. GFLOP/s use XLA's count of the
step's floating-point operations for both frameworks and are set against each framework's
own measured matmul peak (2048^3, all cores); the training FLOPs are counted on the faster
step compiled with XLA's SPMD all-reduce. Each JAX variant runs in a fresh process (the
device count is fixed at JAX import), and PyTorch runs in its own processes, once under the
C library's malloc (as `python` starts) and once under jemalloc (as `cfgdiff.main` runs JAX
on a CPU host).
Records one table in benchmarks/results.jsonl with the CPU model and its vector extensions.
"""

from __future__ import annotations

import argparse
import json
import os

from benchmarks import common
from benchmarks.train_throughput import REFERENCE

# The comparison network (7.66M parameters, batch 64) and the CPU default (batch 16).
MODELS = {"reference": (dict(REFERENCE, **{"model.dropout": 0.0}), 64),
          "fashion_mnist": ({}, 16)}
MATMUL = 2048


def _config(model_name: str):
  from experiments import get_experiment
  config = get_experiment("fashion_mnist")
  for key, value in MODELS[model_name][0].items():
    section, name = key.split(".")
    config[section][name] = value
  config.train.batch_size = MODELS[model_name][1]
  return config


def jax_worker(variant: dict) -> dict:
  """Training step, guided evaluation and matmul peak in JAX; runs in its own process."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from cfgdiff import train_step

  config = _config(variant["model"])
  mesh, model, optimizer, state, images = common.comparison_setup(config)
  steps = {name: train_step.compile_train_step(
               config, model.clone(kernel_grad_taps=taps), optimizer, mesh
           ).lower(state, images).compile()
           for name, taps in (("train_taps", True), ("train_xla_conv", False))}

  def train_once(compiled):
    nonlocal state
    state, metrics = compiled(state, images)
    jax.block_until_ready(metrics)

  def time_alternately(steps: dict) -> None:  # the fastest of two rounds kept
    for name in steps:
      out[f"{name}_s"] = float("inf")
    for _ in range(2):
      for name, compiled in steps.items():
        out[f"{name}_s"] = min(out[f"{name}_s"], common.best_time(
            lambda compiled=compiled: train_once(compiled), variant["steps"]))

  out = {}
  time_alternately(steps)
  faster = min(steps, key=lambda name: out[f"{name}_s"])  # what "auto" keeps
  out["train_s"] = out[f"{faster}_s"]
  counted = steps[faster]
  out["flat_applies"] = train_step.flat_allreduce_applies(config, mesh)
  if out["flat_applies"]:
    # The same step with the gradients summed by XLA's SPMD all-reduce of every array
    # (what the flat all-reduce replaces on CPU), timed against the faster step again.
    counted = common.spmd_train_step(config, model.clone(kernel_grad_taps=faster == "train_taps"),
                                     optimizer, mesh, state, images)
    time_alternately({"train_flat": steps[faster], "train_spmd": counted})
  # The FLOPs of every training row: the faster step's, as the SPMD partitioner compiles it.
  out["train_flops"] = counted.cost_analysis()["flops"] * jax.device_count()

  evaluate, evaluate_once = guided_evaluation(config, model, mesh, state.params)
  out["eval_flops"] = evaluate.cost_analysis()["flops"] * jax.device_count()
  out["eval_s"] = common.best_time(evaluate_once, variant["steps"])

  # The matmul peak: one 2048^3 product per device, all devices at once.
  split, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  a = jax.device_put(np.ones((jax.device_count() * MATMUL, MATMUL), np.float32), split)
  b = jax.device_put(np.ones((MATMUL, MATMUL), np.float32), replicated)
  matmul = jax.jit(jnp.matmul, in_shardings=(split, replicated), out_shardings=split)
  out["matmul_gflops"] = 2 * jax.device_count() * MATMUL**3 / common.best_time(
      lambda: jax.block_until_ready(matmul(a, b)), 5) / 1e9
  return out


def guided_evaluation(config, model, mesh, params) -> tuple:  # (Compiled, () -> None)
  """One guided evaluation (two passes of config.train.batch_size, w = 1) compiled over
  ``mesh`` with the batch split over its devices, and a call of it that blocks until done."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from cfgdiff import guidance
  batch, size = config.train.batch_size, config.data.image_size
  split, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  rng = np.random.default_rng(1)
  z, logsnr, label, w = (jax.device_put(a, split) for a in (
      rng.normal(size=(batch, size, size, 1)).astype(np.float32), np.ones(batch, np.float32),
      (np.arange(batch) % config.data.num_classes).astype(np.int32), np.ones(batch, np.float32)))

  def guided(params, z, logsnr, label, w):
    eps_fn = lambda z, l, y: model.apply({"params": params}, z, l, y)
    return guidance.combine(*guidance.cond_and_uncond(
        eps_fn, z, logsnr, label, config.data.num_classes, False), w)

  evaluate = jax.jit(guided, in_shardings=(replicated,) + (split,) * 4,
                     out_shardings=split).lower(params, z, logsnr, label, w).compile()
  return evaluate, lambda: jax.block_until_ready(evaluate(params, z, logsnr, label, w))


def torch_steps(config) -> tuple:  # (train step, guided evaluation), both () -> object
  """PyTorch eager's training step (Adam) and guided evaluation (two passes, w = 1) of
  ``config``'s network at config.train.batch_size, with common.initial_params' weights."""
  import torch

  from benchmarks.torch_unet import adam_train_step, guided_eps
  batch, size, classes = config.train.batch_size, config.data.image_size, config.data.num_classes
  train_step = adam_train_step(common.torch_network(config), batch, (1, size, size), classes,
                               config.diffusion.p_uncond)
  net, generator = common.torch_network(config), torch.Generator().manual_seed(0)
  z = torch.randn((batch, 1, size, size), generator=generator)
  logsnr, w, label = torch.ones(batch), torch.ones(batch), torch.arange(batch) % classes

  def evaluate():
    with torch.inference_mode():
      return guided_eps(net, z, logsnr, label, w, classes, False)

  return train_step, evaluate


def torch_worker(model_name: str, steps: int) -> dict:
  """Training step, guided evaluation and matmul peak in PyTorch eager; own process."""
  import torch

  torch.set_num_threads(os.cpu_count() or 1)
  train_step, evaluate = torch_steps(_config(model_name))
  out = {"train_s": common.best_time(train_step, steps),
         "eval_s": common.best_time(evaluate, steps)}
  a = torch.ones(MATMUL, MATMUL)
  out["matmul_gflops"] = 2 * MATMUL**3 / common.best_time(lambda: a @ a, 5) / 1e9
  return out


def worker(variant: dict) -> dict:
  """One framework's numbers for one network, with the allocator this process runs."""
  from cfgdiff import allocator
  out = (torch_worker(variant["model"], variant["steps"]) if variant.get("framework") == "torch"
         else jax_worker(variant))
  return dict(out, malloc=allocator.in_use())


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--worker", help="internal: run one JSON variant and print JSON")
  parser.add_argument("--models", default="reference,fashion_mnist")
  parser.add_argument("--steps", type=int, default=6, help="timed repeats (fastest kept)")
  parser.add_argument("--no-write", action="store_true", help="print only")
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(json.loads(args.worker))))
    return

  cores = os.cpu_count() or 1
  header = ["network, batch", "what", f"JAX, {cores} devices, jemalloc (s)",
            f"PyTorch, {cores} threads, glibc (s)", f"PyTorch, {cores} threads, jemalloc (s)",
            "JAX speed / PyTorch's (glibc, jemalloc)", "JAX GFLOP/s (% of its peak)",
            "PyTorch GFLOP/s, jemalloc (% of its peak)"]
  rows = []
  for model_name in args.models.split(","):
    variant = dict(model=model_name, steps=args.steps)
    jax_r = common.run_variant("benchmarks.vs_torch", variant, cores,
                               "--xla_cpu_multi_thread_eigen=false")
    torch_variant = dict(variant, framework="torch")
    torch_r = {malloc: common.run_variant("benchmarks.vs_torch", torch_variant, cores,
                                          malloc=malloc) for malloc in ("system", "jemalloc")}
    label = f"{model_name}, {MODELS[model_name][1]}"
    measured = [("training step (the faster kernel gradient, as 'auto' trains)", "train"),
                ("guided evaluation", "eval"),
                ("training step, conv.py's tap products", "train_taps"),
                ("training step, XLA's kernel gradient", "train_xla_conv")]
    if jax_r["flat_applies"]:
      measured += [("training step, faster kernel gradient, gradients summed as one flat "
                    "vector (timed against the next row)", "train_flat"),
                   ("the same, summed by XLA's SPMD all-reduce of every array", "train_spmd")]
    for what, key in measured:
      torch_key = "eval" if key == "eval" else "train"
      jax_s = jax_r[f"{key}_s"]
      glibc_s, jemalloc_s = (torch_r[m][f"{torch_key}_s"] for m in ("system", "jemalloc"))
      flops = jax_r["eval_flops" if key == "eval" else "train_flops"]
      jax_rate, torch_rate = flops / jax_s / 1e9, flops / jemalloc_s / 1e9
      torch_peak = torch_r["jemalloc"]["matmul_gflops"]
      rows.append([label, what, f"{jax_s:.3f}", f"{glibc_s:.3f}", f"{jemalloc_s:.3f}",
                   f"{glibc_s / jax_s:.2f}, {jemalloc_s / jax_s:.2f}",
                   f"{jax_rate:.0f} ({100 * jax_rate / jax_r['matmul_gflops']:.0f}%)",
                   f"{torch_rate:.0f} ({100 * torch_rate / torch_peak:.0f}%)"
                   if key in ("train", "eval") else "-"])
      print(" | ".join(rows[-1]), flush=True)
    # Each network's workers measure their own peak, which the percentages above use.
    rows.append([label, "matmul 2048^3 peak (GFLOP/s)", f"{jax_r['matmul_gflops']:.0f}",
                 f"{torch_r['system']['matmul_gflops']:.0f}",
                 f"{torch_r['jemalloc']['matmul_gflops']:.0f}", "-", "-", "-"])
    print(" | ".join(rows[-1]), flush=True)
  if not args.no_write:
    common.record("JAX against PyTorch eager, training and guided evaluation",
                          f"python -m benchmarks.vs_torch --models {args.models} "
                          f"--steps {args.steps}", header, rows)


if __name__ == "__main__":
  main()
