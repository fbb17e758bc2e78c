"""One guided evaluation, (1 + w) eps(z, c) - w eps(z, null), JAX against PyTorch eager on
the same network and weights (the issue's reference U-Net, batch 64, 28x28).

  python -m benchmarks.guided_eval_torch [--batch 64] [--repeats 5] [--xla-flags=F ...]

JAX runs jitted in fresh processes on 1 device (all cores) and on one device per core;
PyTorch runs eager with torch.set_num_threads(cores). Both forms: two passes of B and
one fused batch of 2B. Each --xla-flags set adds a row: JAX on one device per core with
those XLA:CPU flags (e.g. --xla_cpu_use_xnnpack=true). Records its table in
benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os

from benchmarks import common
from benchmarks.train_throughput import REFERENCE

CONFIG_OVERRIDES = dict(REFERENCE, **{"model.dropout": 0.0})


def _config():
  from experiments import get_experiment
  config = get_experiment("fashion_mnist")
  for key, value in CONFIG_OVERRIDES.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def jax_worker(variant: dict) -> dict:
  import jax
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from cfgdiff import build, guidance

  config = _config()
  model, mesh = build.make_model(config), build.make_mesh()
  params = common.initial_params(config)
  b = variant["batch"]
  rng = np.random.default_rng(0)
  split, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  z = jax.device_put(rng.normal(size=(b, 28, 28, 1)).astype(np.float32), split)
  logsnr = jax.device_put(np.full(b, 1.0, np.float32), split)
  label = jax.device_put((np.arange(b) % 10).astype(np.int32), split)
  w = jax.device_put(np.full(b, 1.0, np.float32), split)
  out = {"devices": jax.device_count()}
  for fused in (False, True):
    def guided(p, z, l, y, w, fused=fused):
      eps_fn = lambda z, l, y: model.apply({"params": p}, z, l, y)
      cond, uncond = guidance.cond_and_uncond(eps_fn, z, l, y, 10, fused)
      return guidance.combine(cond, uncond, w)
    fn = jax.jit(guided, in_shardings=(rep, split, split, split, split), out_shardings=split)
    out["fused" if fused else "two_pass"] = common.best_time(
        lambda fn=fn: jax.block_until_ready(fn(params, z, logsnr, label, w)),
        variant["repeats"])
  return out


def torch_times(batch: int, repeats: int) -> dict:
  import jax
  import numpy as np
  import torch

  from benchmarks.torch_unet import TorchUNet, guided_eps

  torch.set_num_threads(os.cpu_count() or 1)
  config = _config()
  params = jax.device_get(common.initial_params(config))
  mc = config.model
  net = TorchUNet(params, mc.ch, mc.ch_mult, mc.num_res_blocks, mc.attn_resolutions,
                  mc.head_channels, mc.num_heads)
  rng = np.random.default_rng(0)
  z = torch.from_numpy(rng.normal(size=(batch, 1, 28, 28)).astype(np.float32))
  logsnr, w = torch.full((batch,), 1.0), torch.full((batch,), 1.0)
  label = torch.arange(batch) % 10
  out = {}
  with torch.inference_mode():
    for fused in (False, True):
      out["fused" if fused else "two_pass"] = common.best_time(
          lambda fused=fused: guided_eps(net, z, logsnr, label, w, 10, fused), repeats)
  return out


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--worker")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--xla-flags", action="append", default=[],
                      help="an extra XLA flag set to try (repeatable; one row each), "
                           "written as --xla-flags=--xla_cpu_use_xnnpack=true")
  parser.add_argument("--no-write", action="store_true")
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(jax_worker(json.loads(args.worker))))
    return

  variant = dict(batch=args.batch, repeats=args.repeats)
  cores = os.cpu_count() or 1
  results = {
      "JAX, 1 device (all cores)": common.run_variant("benchmarks.guided_eval_torch",
                                                      variant, 1),
      f"JAX, {cores} devices (one per core)": common.run_variant(
          "benchmarks.guided_eval_torch", variant, cores, "--xla_cpu_multi_thread_eigen=false"),
  }
  for xla_flags in args.xla_flags:
    results[f"JAX, {cores} devices, {xla_flags}"] = common.run_variant(
        "benchmarks.guided_eval_torch", variant, cores,
        f"--xla_cpu_multi_thread_eigen=false {xla_flags}")
  results[f"PyTorch eager, {cores} threads"] = torch_times(args.batch, args.repeats)
  torch_best = min(results[f"PyTorch eager, {cores} threads"].values())
  rows = [[name, f"{r['two_pass']:.3f}", f"{r['fused']:.3f}",
           f"{torch_best / min(r['two_pass'], r['fused']):.2f}"] for name, r in results.items()]
  header = ["implementation", "two passes of B (s)", "fused 2B (s)",
            "speed vs PyTorch's best (higher is faster)"]
  for row in rows:
    print(" | ".join(row))
  if not args.no_write:
    common.record(
        f"One guided evaluation, JAX vs PyTorch eager (reference U-Net, batch {args.batch})",
        f"python -m benchmarks.guided_eval_torch --batch {args.batch}", header, rows)


if __name__ == "__main__":
  main()
