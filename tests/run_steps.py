"""Runs a few tiny train steps on however many devices XLA_FLAGS gives; saves the state.

  python -m tests.run_steps DATA_DIR OUT.npz [STEPS [FSDP [VARIANT]]]

VARIANT "flat" or "spmd" trains without dropout, with the devices' gradients averaged as
one flat vector or as XLA's SPMD step averages them; "flat_micro" is "flat" with
micro-batches of 4. By default: the tiny config's dropout and the step's own choice.
Used by test_train.py to compare device counts and steps in fresh processes.
"""

import re
import sys

import jax
import numpy as np

from cfgdiff import build, sources, train_step
from tests import tiny_config


def allreduce_widths(hlo: str) -> list[int]:
  """How many arrays each all-reduce of a compiled program's HLO text sums."""
  return [len(re.findall(r"[a-z]+[0-9]*\[", line.split("all-reduce(")[0].split("=", 1)[1]))
          for line in hlo.splitlines() if " all-reduce(" in line]


def main(data_dir: str, out: str, steps: int, fsdp: int, variant: str) -> None:
  config = tiny_config.get_config()
  config.data.path = data_dir
  flat_allreduce = {"default": None, "flat": True, "flat_micro": True, "spmd": False}[variant]
  if flat_allreduce is not None:
    config.model.dropout = 0.0
  if variant == "flat_micro":
    config.train.microbatch_size = 4
  mesh = build.make_mesh((-1, fsdp))
  model, optimizer = build.make_model(config), build.make_optimizer(config.train)
  state = build.create_state(config, model, optimizer, mesh)
  batcher = sources.training_batcher(config)
  step_fn = train_step.compile_train_step(config, model, optimizer, mesh, flat_allreduce).lower(
      state, build.global_batch(batcher.batch(0), mesh)).compile()
  losses, grad_norms = [], []
  for step in range(steps):
    state, metrics = step_fn(state, build.global_batch(batcher.batch(step), mesh))
    losses.append(float(metrics["loss"]))
    grad_norms.append(float(metrics["grad_norm"]))
  leaves = jax.tree_util.tree_leaves_with_path(
      {"params": state.params, "ema": state.ema_params, "opt": state.opt_state})
  arrays = {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}
  # Fraction of parameter elements one device holds: 1.0 when replicated.
  held = sum(x.addressable_shards[0].data.size for x in jax.tree.leaves(state.params))
  total = sum(x.size for x in jax.tree.leaves(state.params))
  np.savez(out, losses=np.array(losses), grad_norms=np.array(grad_norms),
           devices=jax.device_count(), held=held / total,
           allreduce_widths=np.array(allreduce_widths(step_fn.as_text()), int), **arrays)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 4,
       int(sys.argv[4]) if len(sys.argv) > 4 else 1,
       sys.argv[5] if len(sys.argv) > 5 else "default")
