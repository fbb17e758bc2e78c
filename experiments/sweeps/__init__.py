"""The paper's evaluation grids, as the cfgdiff commands that run them.

  python -m experiments.sweeps table1 --workdir=gs://BUCKET/table1
  python -m experiments.sweeps table2 --workdir=/shared/i128

prints one training command per model and the --mode=sweep commands, each to be run
with a launcher from launch/ (or locally). Table 1 (ImageNet 64x64): w from 0 to 1 by 0.1,
then 2, 3, 4, for p_uncond 0.1, 0.2, 0.5, T = 256. Table 2 (ImageNet 128x128): one model,
sampled with T = 128, 256 and 1024.
"""

from __future__ import annotations

import argparse

from cfgdiff import configs

TABLE1_WEIGHTS = tuple(configs.default_config().sweep.guidance_weights)
TABLE1 = dict(config="experiments/imagenet64.py", p_uncond=(0.1, 0.2, 0.5), num_steps=(256,),
              guidance_weights=TABLE1_WEIGHTS)
# Table 2 reports w = 0.3 (its best FID) and w = 4.0 (its highest IS) at each T; 0.1 and
# 1.0 fill in the curve between them.
TABLE2 = dict(config="experiments/imagenet128.py", p_uncond=(0.1,), num_steps=(128, 256, 1024),
              guidance_weights=(0.1, 0.3, 1.0, 4.0))
GRIDS = {"table1": TABLE1, "table2": TABLE2}


def commands(grid: dict, workdir: str, extra: str = "") -> list[str]:
  """The training commands (one per p_uncond) and the sweep commands (one per T)."""
  base = f"python -m cfgdiff.main --config={grid['config']}"
  weights = ",".join(str(w) for w in grid["guidance_weights"])
  train = [f"{base} --workdir={workdir}/p_uncond_{p} --config.diffusion.p_uncond={p}{extra}"
           for p in grid["p_uncond"]]
  sweep = [f"{base} --workdir={workdir} --mode=sweep --config.sweep.num_steps={t} "
           f"--config.sweep.guidance_weights='({weights})'{extra}" for t in grid["num_steps"]]
  return train + sweep


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("grid", choices=sorted(GRIDS))
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--extra", default="", help="appended to every command")
  args = parser.parse_args()
  print("\n".join(commands(GRIDS[args.grid], args.workdir,
                           f" {args.extra}" if args.extra else "")))
