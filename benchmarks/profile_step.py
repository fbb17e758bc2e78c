"""Where a compiled training step spends its time on this CPU, by kind of HLO operation.

  python -m benchmarks.profile_step [--model fashion_mnist] [--batch 16] [--steps 5]
      [--no-write]

Runs the real `cfgdiff.train` step (one XLA device per core, as `cfgdiff.main` does) under
`jax.profiler`, joins the trace's per-thunk durations to the optimized HLO, and reports
milliseconds per step summed over the devices: library fusions (YNNPACK/oneDNN
convolutions and matrix products), elementwise loop fusions grouped by the JAX operation
they came from (forward or backward), and copies. Records one table in benchmarks/results.jsonl with
the CPU model and its vector extensions.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from benchmarks import common

# One HLO instruction: name = shape (a tuple for multi-output ones) opcode(
INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\(")


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str, str]]:
  """Name -> (opcode, fusion kind or "", JAX op_name or "") of each top-level instruction."""
  out = {}
  for line in hlo_text.splitlines():
    match = INSTRUCTION.match(line)
    if match:
      kind = re.search(r"kind=(\w+)", line)
      op_name = re.search(r'op_name="([^"]+)"', line)
      out[match.group(1)] = (match.group(3), kind.group(1) if kind else "",
                             op_name.group(1) if op_name else "")
  return out


def category(opcode: str, kind: str, op_name: str) -> str:
  """A readable bucket: 'library fusion', 'copy', or 'elementwise: fwd|bwd <jax op>'."""
  if opcode == "fusion" and kind == "kCustom":
    return "library fusion (convolution, matmul)"
  if opcode in ("copy", "transpose"):
    return "copy / transpose"
  if opcode == "fusion":
    direction = "bwd" if "transpose(" in op_name else "fwd"
    last = re.sub(r"\[.*?\]", "", op_name.split("/")[-1]) or "?"
    return f"elementwise: {direction} {last}"
  return opcode


def profile(model_name: str, batch: int, steps: int) -> tuple[float, dict[str, float]]:
  """(median step seconds, ms per step by category, summed over devices)."""
  import jax
  import numpy as np

  from benchmarks.vs_torch import _config
  config = _config(model_name)
  config.train.batch_size = batch
  mesh, model, optimizer, state, global_batch = common.train_setup(config)
  step, _ = common.training_step(config, model, optimizer, mesh, state, global_batch)

  def run():
    nonlocal state
    state, metrics = step(state, global_batch)
    jax.block_until_ready(metrics)

  for _ in range(3):
    run()
  times = []
  for _ in range(10):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)

  trace_dir = tempfile.mkdtemp(prefix="cfgdiff_profile_")
  jax.profiler.start_trace(trace_dir)
  for _ in range(steps):
    run()
  jax.profiler.stop_trace()
  trace_file = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
  events = json.load(gzip.open(trace_file))["traceEvents"]
  instructions = hlo_instructions(step.as_text())
  by_category: dict[str, float] = collections.Counter()
  for event in events:
    if event.get("ph") == "X" and event.get("name") in instructions:
      by_category[category(*instructions[event["name"]])] += event["dur"] / 1e3 / steps
  return float(np.median(times)), dict(by_category)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--worker", help="internal: run one JSON variant and print JSON")
  parser.add_argument("--model", default="fashion_mnist", help="fashion_mnist or reference")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=5, help="profiled steps")
  parser.add_argument("--top", type=int, default=12, help="categories listed")
  parser.add_argument("--no-write", action="store_true", help="print only")
  args = parser.parse_args()
  if args.worker:
    variant = json.loads(args.worker)
    median, by_category = profile(variant["model"], variant["batch"], variant["steps"])
    print(json.dumps({"median": median, "by_category": by_category}))
    return

  devices = os.cpu_count() or 1
  result = common.run_variant("benchmarks.profile_step", dict(
      model=args.model, batch=args.batch, steps=args.steps), devices,
      "--xla_cpu_multi_thread_eigen=false")
  by_category = result["by_category"]
  total = sum(by_category.values())
  rows = [[name, f"{ms:.1f}", f"{100 * ms / total:.0f}%"]
          for name, ms in sorted(by_category.items(), key=lambda kv: -kv[1])[:args.top]]
  rows.append(["all profiled operations", f"{total:.1f}", "100%"])
  rows.append([f"wall time of one step x {devices} devices",
               f"{1e3 * result['median'] * devices:.1f}", "-"])
  header = ["where (ms per step, summed over devices)", "ms", "share"]
  command = "python -m benchmarks.profile_step " + " ".join(sys.argv[1:])
  title = f"Profile of the {args.model} training step, batch {args.batch}, {devices} devices"
  if args.no_write:
    print("\n".join(" | ".join(str(c) for c in row) for row in [header] + rows))
  else:
    common.record(title, command.strip(), header, rows)


if __name__ == "__main__":
  main()
