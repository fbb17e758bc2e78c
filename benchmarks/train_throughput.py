"""Training throughput: images/s, step time, GFLOP/s (XLA cost analysis), peak memory.

  python -m benchmarks.train_throughput [--models fashion_mnist,imagenet64] [--steps 8]

Each variant runs in its own process (the CPU device count is fixed at JAX import).
Results are printed and recorded in benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from benchmarks import common


def worker(variant: dict) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from cfgdiff import build, train_step
  from experiments import get_experiment

  config = get_experiment("fashion_mnist" if variant["model"] == "reference" else
                          variant["model"])
  config.train.batch_size = variant["batch"]
  config.train.microbatch_size = variant.get("micro", 0)
  config.train.warmup_steps = 1
  for key, value in variant.get("overrides", {}).items():
    section, name = key.split(".")
    config[section][name] = tuple(value) if isinstance(value, list) else value
  mesh = build.make_mesh(tuple(config.runtime.mesh_shape))
  model, optimizer = build.make_model(config), build.make_optimizer(config.train)
  state = build.create_state(config, model, optimizer, mesh)
  step = train_step.compile_train_step(config, model, optimizer, mesh)
  size, ch = config.data.image_size, config.data.channels
  rng = np.random.default_rng(0)
  batch = build.global_batch({
      "image": rng.uniform(-1, 1, (config.train.batch_size, size, size, ch)).astype(np.float32),
      "label": rng.integers(0, config.data.num_classes, config.train.batch_size).astype(np.int32)},
      mesh)
  t0 = time.time()
  compiled = step.lower(state, batch).compile()
  compile_s = time.time() - t0
  memory = compiled.memory_analysis()
  # Per device: the step's arguments (state and batch) and its temporaries.
  state_gib = memory.argument_size_in_bytes / 2**30 if memory else float("nan")
  temp_gib = memory.temp_size_in_bytes / 2**30 if memory else float("nan")
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(variant["steps"]):
    t0 = time.time()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.time() - t0)
  step_s = float(np.median(times))
  peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  counted = compiled  # compiled after the peak memory is read: the real job never does
  if train_step.flat_allreduce_applies(config, mesh):
    counted = common.spmd_train_step(config, model, optimizer, mesh, state, batch)
  flops = (counted.cost_analysis() or {}).get("flops", float("nan"))
  params = sum(x.size for x in jax.tree.leaves(state.params))
  return {"images_per_s": config.train.batch_size / step_s, "step_s": step_s,
          "gflops_per_s": flops / step_s / 1e9, "gflop_per_step": flops / 1e9,
          "compile_s": compile_s, "params_m": params / 1e6,
          "peak_rss_gib": peak_rss_gib,
          "devices": jax.device_count(), "dropout": config.model.dropout,
          "dtype": config.model.dtype, "mesh": list(mesh.devices.shape),
          "args_gib": state_gib, "temp_gib": temp_gib,
          "finite": bool(jnp.isfinite(metrics["loss"]))}


# The reference network: 64 base channels, mults (1,2,2), 2 blocks, attention at 7x7.
REFERENCE = {"model.ch": 64, "model.num_res_blocks": 2, "model.head_channels": 64,
             "model.dropout": 0.1}
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false"
VARIANTS = {
    "reference": [
        dict(devices=1, batch=64, overrides=REFERENCE),
        dict(devices=1, batch=64, micro=16, overrides=REFERENCE),
        dict(devices=2, batch=64, overrides=REFERENCE),
        dict(devices=2, batch=64, micro=16, overrides=REFERENCE),
        dict(devices=2, batch=64, xla=ONE_THREAD, overrides=REFERENCE),
        dict(devices=2, batch=64, xla=ONE_THREAD, overrides=dict(REFERENCE, **{
            "model.dropout": 0.0})),
        dict(devices=2, batch=32, xla=ONE_THREAD, overrides=dict(REFERENCE, **{
            "model.dropout": 0.0})),
        dict(devices=2, batch=128, xla=ONE_THREAD, overrides=dict(REFERENCE, **{
            "model.dropout": 0.0})),
    ],
    "fashion_mnist": [dict(devices=2, batch=64, xla=ONE_THREAD)],
    # ~10-20 s a step here: replicated against FSDP-sharded state, float32 against bf16.
    "imagenet64": [
        dict(devices=2, batch=4, xla=ONE_THREAD, steps=2, overrides={
            "model.dtype": dtype, "runtime.mesh_shape": mesh})
        for dtype in ("float32", "bfloat16") for mesh in ([-1, 1], [1, 2])],
}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--worker", help="internal: run one JSON variant and print JSON")
  parser.add_argument("--models", default="reference,fashion_mnist,imagenet64")
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--no-write", action="store_true", help="print only")
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(json.loads(args.worker))))
    return

  header = ["model", "devices", "threads/device", "mesh (data, fsdp)", "dtype", "batch",
            "micro-batch", "dropout", "images/s", "step s", "GFLOP/step/device",
            "GFLOP/s/device", "args GiB/device", "temp GiB/device", "peak RSS GiB", "compile s"]
  rows = []
  for model in args.models.split(","):
    for v in VARIANTS[model]:
      variant = dict(dict(model=model, steps=args.steps), **v)
      r = common.run_variant("benchmarks.train_throughput", variant, v["devices"],
                             v.get("xla", ""))
      threads = "1" if "eigen=false" in v.get("xla", "") else "all"
      row = [model, r["devices"], threads, tuple(r["mesh"]), r["dtype"], v["batch"],
             v.get("micro", 0) or "-", r["dropout"], f"{r['images_per_s']:.1f}",
             f"{r['step_s']:.3f}", f"{r['gflop_per_step']:.1f}", f"{r['gflops_per_s']:.1f}",
             f"{r['args_gib']:.2f}", f"{r['temp_gib']:.2f}", f"{r['peak_rss_gib']:.2f}",
             f"{r['compile_s']:.0f}"]
      print(" | ".join(str(c) for c in row), flush=True)
      rows.append(row)
  if not args.no_write:
    common.record("Training throughput", "python -m benchmarks.train_throughput "
                          f"--models {args.models} --steps {args.steps}", header, rows)


if __name__ == "__main__":
  main()
