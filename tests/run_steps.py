"""Runs a few tiny train steps on however many devices XLA_FLAGS gives; saves the state.

  python -m tests.run_steps DATA_DIR OUT.npz [STEPS [FSDP]]

Used by test_train.py to compare device counts in fresh processes.
"""

import sys

import jax
import numpy as np

from cfgdiff import build, train
from tests import tiny_config


def main(data_dir: str, out: str, steps: int, fsdp: int) -> None:
  config = tiny_config.get_config()
  config.data.path = data_dir
  mesh = build.make_mesh((-1, fsdp))
  model, optimizer = build.make_model(config), build.make_optimizer(config.train)
  state = build.create_state(config, model, optimizer, mesh)
  step_fn = train.compile_train_step(config, model, optimizer, mesh)
  batcher = train.make_batcher(config)
  losses = []
  for step in range(steps):
    state, metrics = step_fn(state, build.global_batch(batcher.batch(step), mesh))
    losses.append(float(metrics["loss"]))
  leaves = jax.tree_util.tree_leaves_with_path(
      {"params": state.params, "ema": state.ema_params, "opt": state.opt_state})
  arrays = {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}
  # Fraction of parameter elements one device holds: 1.0 when replicated.
  held = sum(x.addressable_shards[0].data.size for x in jax.tree.leaves(state.params))
  total = sum(x.size for x in jax.tree.leaves(state.params))
  np.savez(out, losses=np.array(losses), devices=jax.device_count(), held=held / total,
           **arrays)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 4,
       int(sys.argv[4]) if len(sys.argv) > 4 else 1)
