"""Accelerator memory of a config's training step, per chip, before anything compiles.

  python -m cfgdiff.memory_plan --config=experiments/imagenet64.py --num_chips=64

One chip's share of the step holds:
- the TrainState: parameters, their EMA and Adam's two moments, float32, split over the
  mesh's fsdp axis as `build.leaf_sharding` splits them;
- the gradient and the optimizer's intermediate arrays: `TRANSIENT_STATE_COPIES` float32
  copies of the parameters, the same split (one more with micro-batches: the running sum);
- the activations that the backward pass reads: the residuals of `jax.vjp` over one
  micro-batch's forward pass, measured by tracing it at batch 1 and 2 (nothing compiles),
  a fixed part (parameter casts) plus a part linear in the examples.
The plan is an upper bound: XLA fuses some residuals away; its buffer assignment for the
compiled step on CPU was 1.2-1.4x below the plan, never above, on the configs of
tests/test_memory_plan.py (held to [1, 1 + `ESTIMATE_TOLERANCE`] there). A chip's limit is
JAX's `bytes_limit` where the device reports one (JAX on GPU preallocates 75% of it by
default), else the table below; the plan keeps `HEADROOM` of it free for what it does not
count (cuDNN workspaces, XLA's scheduling, the input pipeline's device buffers).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from cfgdiff import build, configs, diffusion

MiB, GiB = 2**20, 2**30
# Float32 copies of the (per-chip) parameters live during the update besides the state:
# the gradient, and the clipped update optax computes from it.
TRANSIENT_STATE_COPIES = 2
HEADROOM = 0.10  # of the chip's limit, left for what the plan does not count
ESTIMATE_TOLERANCE = 0.5  # plan / XLA - 1 on CPU at most, tests/test_memory_plan.py


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  memory_bytes: int  # per chip, as the vendor's tools report it
  devices_per_node: int  # what mesh fsdp = 0 means on such a node
  source: str


CHIPS = {
    "a100-40gb": Chip("NVIDIA A100 40GB", 40_960 * MiB, 8, "nvidia-smi: 40960 MiB, A100 40GB"),
    "a100-80gb": Chip("NVIDIA A100 80GB", 81_920 * MiB, 8, "nvidia-smi: 81920 MiB, A100 80GB"),
    "h100-80gb": Chip("NVIDIA H100 80GB", 81_559 * MiB, 8, "nvidia-smi: 81559 MiB, H100 SXM"),
    "h200": Chip("NVIDIA H200", 143_771 * MiB, 8, "nvidia-smi: 143771 MiB, H200 SXM"),
    "tpu-v4": Chip("TPU v4", 32 * GiB, 4, "cloud.google.com/tpu/docs/v4: 32 GiB HBM per chip"),
    "tpu-v5e": Chip("TPU v5e", 16 * GiB, 4, "cloud.google.com/tpu/docs/v5e: 16 GiB HBM per chip"),
    "tpu-v5p": Chip("TPU v5p", 95 * GiB, 4, "cloud.google.com/tpu/docs/v5p: 95 GiB HBM per chip"),
}
# jax.Device.device_kind -> CHIPS key, for devices that report no bytes_limit.
DEVICE_KINDS = {"TPU v4": "tpu-v4", "TPU v5 lite": "tpu-v5e", "TPU v5e": "tpu-v5e",
                "TPU v5p": "tpu-v5p", "TPU v5": "tpu-v5p"}


@dataclasses.dataclass(frozen=True)
class Activations:
  """Bytes that the backward pass reads, for one chip's micro-batch of n examples:
  ``fixed + per_example * n``."""
  per_example: int
  fixed: int

  def bytes(self, examples: int) -> int:
    return self.fixed + self.per_example * examples


def _nbytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _residual_bytes(config: ml_collections.ConfigDict, batch: int) -> int:
  """Bytes of what `jax.vjp` keeps of the training loss's forward pass at ``batch``
  examples: the step's loss (`train_step.make_train_step`) traced, never run."""
  model = build.make_model(config)
  size, channels, dc = config.data.image_size, config.data.channels, config.diffusion

  def residuals(rng, images, labels):
    params = build.init_state(config, model, build.make_optimizer(config.train), rng).params
    noise_rng, dropout_rng = jax.random.split(rng)
    noised = diffusion.noise_batch(noise_rng, images, labels, p_uncond=dc.p_uncond,
                                   num_classes=config.data.num_classes,
                                   logsnr_min=dc.logsnr_min, logsnr_max=dc.logsnr_max)

    def loss(p):
      eps_pred = model.apply({"params": p}, noised["z"], noised["logsnr"], noised["label"],
                             train=True, rngs={"dropout": dropout_rng})
      return diffusion.eps_loss(eps_pred, noised["eps"])
    return jax.vjp(loss, params)[1]  # a pytree whose leaves are the residuals

  shapes = jax.eval_shape(residuals, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32),
                          jax.ShapeDtypeStruct((batch,), jnp.int32))
  return _nbytes(shapes)


def activations(config: ml_collections.ConfigDict) -> Activations:
  """The step's saved activations, from two traces (batch 1 and 2): a second each for the
  tiny configs, about 15 s each for ImageNet 64 on a 2-core host."""
  one, two = _residual_bytes(config, 1), _residual_bytes(config, 2)
  return Activations(per_example=two - one, fixed=max(0, 2 * one - two))


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """One chip's memory for the training step of a config on ``num_chips`` chips."""
  num_parameters: int
  state_bytes: int  # parameters, EMA, Adam moments: this chip's share
  parameter_bytes: int  # one float32 copy of the parameters: this chip's share
  activations: Activations
  examples_per_chip: int  # train.batch_size / num_chips
  microbatch_per_chip: int  # examples per chip in one forward/backward
  batch_input_bytes_per_example: int

  def step_bytes(self, microbatch_per_chip: int | None = None) -> int:
    """Peak bytes of the step on one chip, with ``microbatch_per_chip`` examples per
    forward/backward (default: the plan's)."""
    micro = microbatch_per_chip or self.microbatch_per_chip
    accumulating = micro < self.examples_per_chip
    transient = (TRANSIENT_STATE_COPIES + accumulating) * self.parameter_bytes
    return (self.state_bytes + transient + self.activations.bytes(micro)
            + self.batch_input_bytes_per_example * self.examples_per_chip)

  def largest_microbatch(self, limit_bytes: int) -> int:
    """Most examples per forward/backward within ``limit_bytes`` less `HEADROOM`
    (0 when not even one example fits)."""
    budget = limit_bytes * (1 - HEADROOM)
    fixed = self.step_bytes(1) - self.activations.per_example
    return max(0, int((budget - fixed) // max(1, self.activations.per_example)))


def make_plan(config: ml_collections.ConfigDict, num_chips: int, fsdp: int,
              acts: Activations | None = None) -> MemoryPlan:
  """The plan for ``config`` with its batch split over ``num_chips`` chips and its state
  over ``fsdp`` of them (mesh (num_chips / fsdp, fsdp))."""
  model = build.make_model(config)
  optimizer = build.make_optimizer(config.train)
  state = jax.eval_shape(lambda rng: build.init_state(config, model, optimizer, rng),
                         jax.random.PRNGKey(0))

  def chip_share(tree) -> int:  # an array split over fsdp when its largest axis divides
    return sum(_nbytes([x]) // (fsdp if any(d % fsdp == 0 for d in x.shape) and fsdp > 1
                                else 1) for x in jax.tree.leaves(tree))
  examples = config.train.batch_size // num_chips
  micro = (config.train.microbatch_size // num_chips if config.train.microbatch_size
           else examples)
  size, channels = config.data.image_size, config.data.channels
  return MemoryPlan(
      num_parameters=sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
      state_bytes=chip_share(state), parameter_bytes=chip_share(state.params),
      activations=acts or activations(config), examples_per_chip=examples,
      microbatch_per_chip=micro, batch_input_bytes_per_example=4 * size * size * channels + 4)


def microbatch_size_that_fits(config: ml_collections.ConfigDict, plan: MemoryPlan,
                              num_chips: int, limit_bytes: int) -> int:
  """The largest train.microbatch_size (global: it divides train.batch_size and the chip
  count divides it) whose step fits in ``limit_bytes``; 0 when none does."""
  most = plan.largest_microbatch(limit_bytes)
  fitting = [m for m in range(num_chips, config.train.batch_size + 1, num_chips)
             if config.train.batch_size % m == 0 and m // num_chips <= most]
  return max(fitting, default=0)


def memory_stats(device: jax.Device) -> dict:
  """The device's memory statistics (bytes_limit, peak_bytes_in_use, ...); {} where it
  reports none (CPU, some plugins)."""
  try:
    return device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  # plugins raise instead of None
    return {}


def device_limit_bytes(device: jax.Device) -> tuple[int, str] | None:
  """What one device may hold, and where that number comes from; None when unknown."""
  stats = memory_stats(device)
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.device_kind}, JAX's bytes_limit"
  chip = CHIPS.get(DEVICE_KINDS.get(device.device_kind, ""))
  return (chip.memory_bytes, f"{chip.name}, {chip.source}") if chip else None


def fit(config: ml_collections.ConfigDict, plan: MemoryPlan, num_chips: int,
        limit_bytes: int, where: str) -> tuple[int, str]:
  """Checks the step fits one chip's ``limit_bytes``.

  Returns (train.microbatch_size to use, a log line): the config's own when it fits, the
  largest that fits when the config sets none (0) and the whole per-chip batch does not.
  Raises ConfigError, in one line naming the value that fits, when the config's own
  micro-batch does not fit, or nothing does.
  """
  usable = limit_bytes * (1 - HEADROOM)
  needed = plan.step_bytes()
  summary = (f"{plan.num_parameters / 1e6:.1f}M parameters; per chip: state "
             f"{plan.state_bytes / GiB:.2f} GiB, activations "
             f"{plan.activations.per_example / MiB:.1f} MiB per example")
  if needed <= usable:
    return config.train.microbatch_size, (
        f"Memory plan: {needed / GiB:.2f} GiB of {usable / GiB:.1f} usable per chip "
        f"({where}) for {plan.microbatch_per_chip} example(s) per pass; {summary}.")
  fitting = microbatch_size_that_fits(config, plan, num_chips, limit_bytes)
  if not fitting:
    raise configs.ConfigError(
        f"The training step needs {plan.step_bytes(1) / GiB:.1f} GiB per chip even at one "
        f"example per pass, over the {usable / GiB:.1f} GiB usable on {where} ({summary}): "
        f"shard the state over more chips (runtime.mesh_shape=(-1,N)) or shrink the model.")
  fits_bytes = plan.step_bytes(fitting // num_chips)
  if config.train.microbatch_size:
    raise configs.ConfigError(
        f"train.microbatch_size={config.train.microbatch_size} needs {needed / GiB:.1f} GiB "
        f"per chip, over the {usable / GiB:.1f} GiB usable on {where}: use "
        f"--config.train.microbatch_size={fitting} ({fits_bytes / GiB:.1f} GiB).")
  return fitting, (
      f"Memory plan: {plan.examples_per_chip} examples per chip need {needed / GiB:.1f} GiB, "
      f"over the {usable / GiB:.1f} GiB usable ({where}); train.microbatch_size={fitting} "
      f"({fitting // num_chips} per chip per pass, {fits_bytes / GiB:.1f} GiB) chosen; "
      f"{summary}.")


def check_training(config: ml_collections.ConfigDict, fsdp: int) -> None:
  """At training start-up, before anything is written or compiled: logs the plan for
  this device's limit (runtime.device_memory_gib, else the accelerator's own; CPU hosts
  are not checked unless it is set), sets train.microbatch_size when the per-device batch
  needs micro-batches, raises ConfigError when nothing fits."""
  device = jax.local_devices()[0]
  if config.runtime.device_memory_gib:
    limit, where = int(config.runtime.device_memory_gib * GiB), "runtime.device_memory_gib"
  elif jax.default_backend() == "cpu":
    return
  else:
    known = device_limit_bytes(device)
    if known is None:
      logging.warning("Memory plan: %s reports no memory limit and is not in "
                      "memory_plan.CHIPS; set runtime.device_memory_gib to check the step.",
                      device.device_kind)
      return
    limit, where = known
  plan = make_plan(config, jax.device_count(), fsdp)
  config.train.microbatch_size, line = fit(config, plan, jax.device_count(), limit, where)
  logging.info(line)


def report(config: ml_collections.ConfigDict, num_chips: int) -> list[list[str]]:
  """One row per chip in `CHIPS`: the plan with fsdp = one node (mesh_shape (-1, 0)), or
  the config's own fsdp."""
  acts = activations(config)
  rows = []
  for key, chip in CHIPS.items():
    fsdp = tuple(config.runtime.mesh_shape)[1]
    fsdp = min(num_chips, chip.devices_per_node) if fsdp == 0 else fsdp
    plan = make_plan(config, num_chips, fsdp, acts)
    best = plan.largest_microbatch(chip.memory_bytes)
    micro = microbatch_size_that_fits(config, plan, num_chips, chip.memory_bytes)
    whole = plan.step_bytes() <= chip.memory_bytes * (1 - HEADROOM)
    rows.append([key, f"{chip.memory_bytes / GiB:.1f}", f"{plan.num_parameters / 1e6:.1f}M",
                 f"{plan.state_bytes / GiB:.2f}", f"{plan.activations.per_example / MiB:.1f}",
                 str(best), str(plan.examples_per_chip),
                 f"{plan.step_bytes() / GiB:.1f}",
                 "whole batch" if whole else (f"microbatch_size={micro}" if micro else "no")])
  return rows


HEADER = ["chip", "GiB", "parameters", "state GiB/chip (fsdp)", "activations MiB/example",
          "examples/chip that fit", "examples/chip in config", "step GiB/chip", "fits"]


def main(argv: list[str]) -> None:
  del argv
  config, num_chips = flags.FLAGS.config, flags.FLAGS.num_chips
  configs.check_known_keys(config)
  print(f"{flags.FLAGS['config'].config_filename}: batch {config.train.batch_size} over "
        f"{num_chips} chips, model dtype {config.model.dtype}, mesh_shape "
        f"{tuple(config.runtime.mesh_shape)}; {HEADROOM:.0%} of each chip kept free")
  rows = report(config, num_chips)
  widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
  for row in [HEADER, *rows]:
    print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
  for chip in CHIPS.values():
    print(f"  {chip.name}: {chip.source}")


if __name__ == "__main__":  # flags only here: cfgdiff.main imports this module
  config_flags.DEFINE_config_file("config", None, "an experiments/*.py config file",
                                  lock_config=True)
  flags.DEFINE_integer("num_chips", 8, "chips the batch is split over (8: one node)")
  flags.mark_flag_as_required("config")
  app.run(main)
