"""Parameter count and forward GFLOPs per image (XLA cost analysis) of each experiment's U-Net.

  python -m benchmarks.model_size [--experiments fashion_mnist,imagenet64]

Records its table in benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from cfgdiff import build
from experiments import get_experiment


def measure(name: str, batch: int = 2) -> tuple[float, float]:
  """(parameters in millions, forward GFLOPs per image)."""
  config = get_experiment(name)
  model = build.make_model(config)
  size, ch = config.data.image_size, config.data.channels
  x, l, y = jnp.zeros((batch, size, size, ch)), jnp.zeros(batch), jnp.zeros(batch, jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, l, y)
  count = sum(p.size for p in jax.tree.leaves(params))
  compiled = jax.jit(model.apply).lower(params, x, l, y).compile()
  flops = compiled.cost_analysis()["flops"]
  return count / 1e6, flops / batch / 1e9


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--experiments", default="fashion_mnist,imagenet64")
  args = parser.parse_args()
  rows = []
  for name in args.experiments.split(","):
    params_m, gflops = measure(name)
    rows.append([name, f"{params_m:.2f}M", f"{gflops:.2f}"])
    print(" | ".join(rows[-1]), flush=True)
  from benchmarks import common
  common.record("Model size", "python -m benchmarks.model_size --experiments "
                        f"{args.experiments}", ["experiment", "parameters",
                                                "forward GFLOPs per image"], rows)


if __name__ == "__main__":
  main()
