"""Accelerator-hours for the paper's runs, from XLA's FLOP count of each model.

  python -m benchmarks.compute_plan [--runs=imagenet64,imagenet128,cifar10]

Training costs 3x a forward pass per image (forward, and a backward of twice its
cost); a guided sampling step costs 2 forward passes (conditional and unconditional).
Hours = FLOPs / (peak bf16 FLOP/s x utilisation). Records its table in benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse

from benchmarks import common
from benchmarks.model_size import measure

# Dense bf16 peak per chip, TFLOP/s (vendor data sheets).
PEAK_TFLOPS = {"TPU v5e": 197.0, "TPU v4": 275.0, "A100": 312.0, "H100 SXM": 989.0}
# The paper's runs (sections 4.1, 4.2; DESIGN.md section 2), and the one-GPU CIFAR-10 run
# (experiments/cifar10.py: its own steps and sweep).
RUNS = {
    "imagenet64": dict(steps=400_000, batch=2048, cells=14 * 3, T=256, samples=50_000),
    "imagenet128": dict(steps=2_700_000, batch=256, cells=14 * 3, T=256, samples=50_000),
    "cifar10": dict(steps=60_000, batch=128, cells=7, T=256, samples=10_000),
}


def plan(utilisation: float, runs: list[str]) -> list[list[str]]:
  rows = []
  for name in runs:
    run = RUNS[name]
    _, gflops = measure(name, batch=1)
    train_flops = 3 * gflops * 1e9 * run["steps"] * run["batch"]
    sweep_flops = 2 * gflops * 1e9 * run["T"] * run["samples"] * run["cells"]
    for chip, peak in PEAK_TFLOPS.items():
      rate = peak * 1e12 * utilisation
      rows.append([name, f"{gflops:.1f}", f"{train_flops:.2e}", chip,
                   f"{train_flops / rate / 3600:,.1f}", f"{sweep_flops / rate / 3600:,.1f}"])
      print(" | ".join(rows[-1]), flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--utilisation", type=float, default=0.4)
  parser.add_argument("--runs", default=",".join(RUNS))
  args = parser.parse_args()
  rows = plan(args.utilisation, args.runs.split(","))
  common.record(
      f"Compute plan (model FLOP utilisation {args.utilisation:.0%})",
      f"python -m benchmarks.compute_plan --runs={args.runs}",
      ["experiment", "forward GFLOPs/image", "training FLOPs", "chip",
       "training chip-hours", "sweep chip-hours (the config's cells x samples, T=256)"], rows)


if __name__ == "__main__":
  main()
