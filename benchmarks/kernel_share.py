"""How much of each framework's step is convolutions and matrix products, one core each.

  python -m benchmarks.kernel_share [--models reference,fashion_mnist] [--steps 4]
      [--no-write]

For each network and task (training step with Adam; one guided evaluation, two passes),
JAX (one XLA device, the training step's kernel gradient as `cfgdiff.main` picks it
on this machine) and PyTorch eager (one thread) each run in a fresh process pinned to
one core, both under jemalloc, on vs_torch's networks, weights and per-core batch (half of
vs_torch's global batch on 2 cores). Each step is timed unprofiled (best of ``--steps``
after warm-up), then ``--steps`` more calls are profiled for the mean time per step in
convolutions and matrix products: for JAX, the trace joined to the optimized HLO, counting
the operations that are a `convolution` or `dot` or a fusion holding one (XLA:CPU's
library fusions); for PyTorch, `torch.profiler`'s self time of its convolution and
matrix-product operators. "Everything else" (elementwise work, copies, the framework's
own overhead) is the unprofiled step time minus that. The last column, all profiled
operations' mean time over the unprofiled step time, shows how much of the step the
profile accounts for: profiling overhead and the best-versus-mean difference put it a few
percent either side of 1, and XLA:CPU's concurrent operations would push it well above.

The column "if everything else were free" bounds what faster elementwise code can buy:
PyTorch's step time over JAX's convolutions and matrix products alone, the speed JAX would
have if everything else took no time at all. Records one table in benchmarks/results.jsonl with the
CPU model and its vector extensions.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import tempfile

from benchmarks import common, profile_step

# PyTorch operators whose own time is convolution or matrix-product arithmetic (oneDNN,
# MKL, and the slow_conv2d path PyTorch takes for some 1x1 convolutions at small batches);
# composite operators (aten::linear, aten::convolution) only dispatch to these.
TORCH_KERNELS = ("aten::mkldnn_convolution", "aten::convolution_backward",
                 "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward", "aten::mm",
                 "aten::bmm", "aten::addmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
# Calls before timing: PyTorch's first steps at a new shape are up to 1.8x slower.
WARM_UP = 3
_COMPUTATION = re.compile(r"(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def kernel_instructions(hlo_text: str) -> set[str]:
  """Names of the instructions an optimized HLO module runs as its own operations (not
  inside a fusion) that are convolutions or matrix products: the bare ops, and fusions
  whose fused computation holds one (XLA:CPU's library fusions)."""
  bodies: dict[str, list[str]] = {}
  computation = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group(1)
      bodies[computation] = []
    elif computation is not None:
      bodies[computation].append(line)
  fused = set()  # the computations fusions call
  for lines in bodies.values():
    for line in lines:
      match, calls = profile_step.INSTRUCTION.match(line), _CALLS.search(line)
      if match and match.group(3) == "fusion" and calls:
        fused.add(calls.group(1))
  with_kernel = {name for name, lines in bodies.items()
                 if any(re.search(r" (convolution|dot)\(", line) for line in lines)}
  names = set()
  for name, lines in bodies.items():
    if name in fused:
      continue  # instructions inside a fusion never run as operations of their own
    for line in lines:
      match = profile_step.INSTRUCTION.match(line)
      if not match:
        continue
      calls = _CALLS.search(line)
      if match.group(3) in ("convolution", "dot") or (
          match.group(3) == "fusion" and calls and calls.group(1) in with_kernel):
        names.add(match.group(1))
  return names


def _jax_step(config, task: str) -> tuple:  # (Compiled, () -> None)
  """The train step `cfgdiff.main` would train with (common.training_step), or the guided
  evaluation, on this process's one device, and a call of it that blocks until done."""
  import jax

  from benchmarks import vs_torch
  mesh, model, optimizer, state, images = common.comparison_setup(config)
  if task == "eval":
    return vs_torch.guided_evaluation(config, model, mesh, state.params)
  step, _ = common.training_step(config, model, optimizer, mesh, state, images)

  def run():  # the step donates the state: each call feeds it the last one's
    nonlocal state
    state, metrics = step(state, images)
    jax.block_until_ready(metrics)

  return step, run


def jax_worker(variant: dict) -> dict:
  """(step seconds, of which convolutions and matrix products) of JAX on one device."""
  import jax

  from benchmarks import vs_torch
  config = vs_torch._config(variant["model"])
  config.train.batch_size = variant["batch"]
  compiled, run = _jax_step(config, variant["task"])
  for _ in range(WARM_UP):
    run()
  step_s = common.best_time(run, variant["steps"])
  trace_dir = tempfile.mkdtemp(prefix="cfgdiff_kernel_share_")
  jax.profiler.start_trace(trace_dir)
  for _ in range(variant["steps"]):
    run()
  jax.profiler.stop_trace()
  trace = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
  kernels = kernel_instructions(compiled.as_text())
  instructions = profile_step.hlo_instructions(compiled.as_text())
  ops = [event for event in json.load(gzip.open(trace))["traceEvents"]
         if event.get("ph") == "X" and event.get("name") in instructions]
  kernel_s = sum(e["dur"] for e in ops if e["name"] in kernels) / 1e6 / variant["steps"]
  if not kernel_s:
    raise RuntimeError("no convolution or matrix product of the compiled step was found in "
                       "its trace: has XLA:CPU renamed its trace events or its HLO text?")
  return {"step_s": step_s, "kernel_s": kernel_s,
          "profiled_s": sum(e["dur"] for e in ops) / 1e6 / variant["steps"]}


def torch_worker(variant: dict) -> dict:
  """(step seconds, of which convolutions and matrix products) of PyTorch, one thread."""
  import torch
  from torch.profiler import ProfilerActivity, profile

  from benchmarks import vs_torch
  torch.set_num_threads(1)
  config = vs_torch._config(variant["model"])
  config.train.batch_size = variant["batch"]
  train_step, evaluate = vs_torch.torch_steps(config)
  run = train_step if variant["task"] == "train" else evaluate
  for _ in range(WARM_UP):
    run()
  step_s = common.best_time(run, variant["steps"])
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(variant["steps"]):
      run()
  rows = prof.key_averages()
  kernel_s = sum(r.self_cpu_time_total for r in rows if r.key in TORCH_KERNELS) / 1e6 / (
      variant["steps"])
  if not kernel_s:
    raise RuntimeError(f"none of {TORCH_KERNELS} in PyTorch's profile: has it renamed them?")
  return {"step_s": step_s, "kernel_s": kernel_s,
          "profiled_s": sum(r.self_cpu_time_total for r in rows) / 1e6 / variant["steps"]}


def worker(variant: dict) -> dict:
  """One framework's step on one network and task, in this process pinned to one core."""
  os.sched_setaffinity(0, {variant["core"]})  # before any thread pool starts
  return torch_worker(variant) if variant["framework"] == "torch" else jax_worker(variant)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--worker", help="internal: run one JSON variant and print JSON")
  parser.add_argument("--models", default="reference,fashion_mnist")
  parser.add_argument("--steps", type=int, default=4, help="timed and profiled repeats")
  parser.add_argument("--no-write", action="store_true", help="print only")
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(json.loads(args.worker))))
    return

  from benchmarks import vs_torch
  core = max(os.sched_getaffinity(0))
  header = ["network, batch on one core", "what", "framework", "step (s)",
            "convolutions and matrix products (s)", "everything else (s)",
            "JAX speed / PyTorch's", "JAX speed / PyTorch's if everything else were free",
            "profiled operations / step time"]
  rows = []
  for model_name in args.models.split(","):
    batch = vs_torch.MODELS[model_name][1] // 2
    for task, what in (("train", "training step"), ("eval", "guided evaluation")):
      results = {framework: common.run_variant("benchmarks.kernel_share", dict(
          framework=framework, model=model_name, task=task, batch=batch, steps=args.steps,
          core=core), devices=1) for framework in ("jax", "torch")}
      torch_s = results["torch"]["step_s"]
      for framework, name in (("jax", "JAX, 1 device"), ("torch", "PyTorch eager, 1 thread")):
        r = results[framework]
        rows.append([f"{model_name}, {batch}", what, name, f"{r['step_s']:.3f}",
                     f"{r['kernel_s']:.3f} ({100 * r['kernel_s'] / r['step_s']:.0f}%)",
                     f"{r['step_s'] - r['kernel_s']:.3f}",
                     f"{torch_s / r['step_s']:.2f}" if framework == "jax" else "-",
                     f"{torch_s / r['kernel_s']:.2f}" if framework == "jax" else "-",
                     f"{r['profiled_s'] / r['step_s']:.2f}"])
        print(" | ".join(rows[-1]), flush=True)
  if not args.no_write:
    command = f"python -m benchmarks.kernel_share --models {args.models} --steps {args.steps}"
    common.record("Convolutions and matrix products against everything else, "
                          "JAX and PyTorch on one core", command, header, rows)


if __name__ == "__main__":
  main()
