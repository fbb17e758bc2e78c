"""Guided sampling throughput for the CPU default model.

  python -m benchmarks.sample_throughput [--devices 2] [--batch 80]

Measured in one process so the variants compare as ratios: images/s for the ancestral
sampler at T=256 and DPM-Solver++(2M) at 20 steps, the cost of a guided step over an
unguided one (floor 2.0), fused (one 2B batch) versus two passes, and the saving of a
guidance interval. Records its table in benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time

LIMITED_INTERVAL = (-4.0, 4.0)


def worker(variant: dict) -> dict:
  import jax
  import jax.numpy as jnp

  from cfgdiff import build, samplers, sampling
  from experiments import get_experiment

  config = get_experiment("fashion_mnist")
  mesh = build.make_mesh()
  model = build.make_model(config)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros(1),
                      jnp.zeros(1, jnp.int32))["params"]
  batch, results = variant["batch"], {}

  def timed(name, steps, fused, w, interval):
    spec = samplers.SamplerSpec(name, steps, fused=fused)
    jitted = sampling.jit_sample_fn(model, mesh, spec, (28, 28, 1), 10)
    args = ((params, None), samplers.example_keys(0, jnp.arange(batch)), jnp.arange(batch) % 10,
            jnp.full(batch, w), samplers.GuidanceOptions.create(interval=interval))
    jax.block_until_ready(jitted(*args))
    best = float("inf")
    for _ in range(variant["repeats"]):
      t0 = time.time()
      _, nfe = jax.block_until_ready(jitted(*args))
      best = min(best, time.time() - t0)
    return best, int(nfe)

  everywhere, nowhere = (-1e9, 1e9), (1e8, 1e9)
  for key, (name, steps) in {"ancestral_256": ("ancestral", 256),
                             "dpmpp_2m_20": ("dpmpp_2m", 20)}.items():
    results[key] = timed(name, steps, variant["fused"], 1.0, everywhere)
  steps = variant["ratio_steps"]
  results["unguided"] = timed("ddim", steps, False, 1.0, nowhere)
  results["two_pass"] = timed("ddim", steps, False, 1.0, everywhere)
  results["fused"] = timed("ddim", steps, True, 1.0, everywhere)
  results["interval"] = timed("ddim", steps, variant["fused"], 1.0, LIMITED_INTERVAL)
  results["devices"] = jax.device_count()
  return results


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--worker")
  parser.add_argument("--devices", type=int, default=2)
  parser.add_argument("--batch", type=int, default=80)
  parser.add_argument("--ratio-steps", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--no-write", action="store_true")
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(json.loads(args.worker))))
    return

  from benchmarks import common
  variant = dict(batch=args.batch, fused=False, ratio_steps=args.ratio_steps,
                 repeats=args.repeats)
  r = common.run_variant("benchmarks.sample_throughput", variant, args.devices,
                         "--xla_cpu_multi_thread_eigen=false" if args.devices > 1 else "")
  per_image = lambda key: f"{args.batch / r[key][0]:.2f}"
  guided_over_unguided = r["two_pass"][0] / r["unguided"][0]
  rows = [
      ["ancestral, T=256, guided", per_image("ancestral_256"), f"{r['ancestral_256'][0]:.1f}",
       r["ancestral_256"][1]],
      ["DPM-Solver++(2M), 20 steps, guided", per_image("dpmpp_2m_20"),
       f"{r['dpmpp_2m_20'][0]:.1f}", r["dpmpp_2m_20"][1]],
      [f"DDIM {args.ratio_steps} steps, unguided (w ignored)", per_image("unguided"),
       f"{r['unguided'][0]:.1f}", r["unguided"][1]],
      [f"DDIM {args.ratio_steps} steps, guided, two passes", per_image("two_pass"),
       f"{r['two_pass'][0]:.1f}", r["two_pass"][1]],
      [f"DDIM {args.ratio_steps} steps, guided, fused 2B batch", per_image("fused"),
       f"{r['fused'][0]:.1f}", r["fused"][1]],
      [f"DDIM {args.ratio_steps} steps, guided only for l in {LIMITED_INTERVAL}",
       per_image("interval"), f"{r['interval'][0]:.1f}", r["interval"][1]],
  ]
  header = ["variant", "images/s", "seconds per batch", "network evals per image"]
  for row in rows:
    print(" | ".join(str(c) for c in row))
  summary = (f"guided/unguided time {guided_over_unguided:.2f} (floor 2.0); fused/two-pass "
             f"time {r['fused'][0] / r['two_pass'][0]:.2f}; interval/full guided time "
             f"{r['interval'][0] / r['two_pass'][0]:.2f}")
  print(summary)
  if not args.no_write:
    common.record(
        f"Sampling throughput (Fashion-MNIST default model, batch {args.batch}, "
        f"{r['devices']} devices)", "python -m benchmarks.sample_throughput "
        f"--devices {args.devices} --batch {args.batch}", header, rows, notes=[f"{summary}."])


if __name__ == "__main__":
  main()
