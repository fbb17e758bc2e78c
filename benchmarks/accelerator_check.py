"""The accelerator check: does cfgdiff run on this GPU or TPU, and how fast.

  python -m benchmarks.accelerator_check                      # ImageNet 64, on what JAX sees
  python -m benchmarks.accelerator_check --config=tests/tiny_config.py --nowrite   # CPU, CI

On random batches of the right shapes (no dataset, no downloaded weights) it runs the
config's real training step (`kernel_choice.compile_train_step`, the config's dtype:
bf16 for ImageNet 64) at --per_chip_batch examples per chip, the guided sampler (the
config's sweep sampler and steps, both guidance passes), and the FID Inception features
(random weights: same cost as the real ones). It prints images/s per chip, TFLOP/s from
XLA's own FLOP count, the fraction of the chip's bf16 peak (PEAK_BF16_TFLOPS), peak
device memory against `cfgdiff.memory_plan`, and projects the paper's training run and
one Table-1 sweep (the config's w grid at sweep.num_samples each) from the measured rates.
About 3-6 minutes on one GPU, most of it compiling the ImageNet-64 step and sampler.
Needs jax, flax, optax and orbax (`pip install -e .`, or `pip install -e '.[cuda12]'`).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import common
from cfgdiff import build, memory_plan, samplers, sampling
from cfgdiff.evaluation import inception

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/imagenet64.py",
                                          "the config whose step is measured")
_PER_CHIP = flags.DEFINE_integer("per_chip_batch", 32,
                                 "training examples per chip (32: the paper's 2048 over 64 "
                                 "chips)")
_STEPS = flags.DEFINE_integer("steps", 10, "timed training steps (after 2 untimed)")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 64, "samples per chip in one batch")
_INCEPTION_BATCH = flags.DEFINE_integer("inception_batch", 200, "images per chip")
_PAPER_STEPS = flags.DEFINE_integer("paper_steps", 400_000, "the paper's training steps")
_PAPER_BATCH = flags.DEFINE_integer("paper_batch", 2048, "the paper's global batch")
_WRITE = flags.DEFINE_bool("write", True,
                           "record the tables in benchmarks/results.jsonl (--nowrite: print only)")

# Dense bf16 peak per chip, TFLOP/s, by a lower-case piece of jax.Device.device_kind, first
# match wins; each from the vendor's data sheet.
PEAK_BF16_TFLOPS = (
    ("h200", 989.0, "NVIDIA H200 SXM data sheet (1,979 with sparsity)"),
    ("h100 pcie", 756.0, "NVIDIA H100 PCIe data sheet (1,513 with sparsity)"),
    ("h100", 989.0, "NVIDIA H100 SXM data sheet (1,979 with sparsity)"),
    ("a100", 312.0, "NVIDIA A100 data sheet (624 with sparsity)"),
    ("l4", 121.0, "NVIDIA L4 data sheet (242 with sparsity)"),
    ("tpu v4", 275.0, "cloud.google.com/tpu/docs/v4"),
    ("tpu v5 lite", 197.0, "cloud.google.com/tpu/docs/v5e"),
    ("tpu v5e", 197.0, "cloud.google.com/tpu/docs/v5e"),
    ("tpu v5", 459.0, "cloud.google.com/tpu/docs/v5p"),
    ("tpu v6", 918.0, "cloud.google.com/tpu/docs/v6e"),
)


def chip_peak(device_kind: str) -> tuple[float, str] | None:
  kind = device_kind.lower()
  return next(((peak, source) for key, peak, source in PEAK_BF16_TFLOPS if key in kind), None)


def _flops(stage) -> float:
  """XLA's FLOP count of a jax.stages.Lowered (no compile) or Compiled program."""
  costs = stage.cost_analysis()
  costs = costs[0] if isinstance(costs, (list, tuple)) else costs
  return float((costs or {}).get("flops", float("nan")))


def measure_training(config) -> dict:
  """Images/s per chip and TFLOP/s of the training step at --per_chip_batch."""
  chips = jax.device_count()
  config.train.batch_size = _PER_CHIP.value * chips
  config.train.microbatch_size = 0
  mesh, model, optimizer, state, batch = common.train_setup(config)
  start = time.perf_counter()
  step, _ = common.training_step(config, model, optimizer, mesh, state, batch)
  compile_s = time.perf_counter() - start
  flops = _flops(step)  # one chip's program
  for _ in range(2):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / _STEPS.value
  plan = memory_plan.make_plan(config, chips, fsdp=1)
  return {"compile_s": compile_s, "step_s": seconds,
          "images_per_s": _PER_CHIP.value / seconds, "tflops": flops / seconds / 1e12,
          "loss": float(metrics["loss"]), "plan_bytes": plan.step_bytes(),
          "peak_bytes": memory_plan.memory_stats(jax.local_devices()[0]).get("peak_bytes_in_use"),
          "state": state}


def measure_sampler(config, params) -> dict:
  """Images/s per chip of the config's sweep sampler (both guidance passes, w = 1)."""
  chips = jax.device_count()
  batch = _SAMPLE_BATCH.value * chips
  spec = samplers.SamplerSpec(config.sweep.sampler, config.sweep.num_steps)
  mesh, model = build.make_mesh(), build.make_model(config)
  size, channels, classes = config.data.image_size, config.data.channels, config.data.num_classes
  fn = sampling.jit_sample_fn(model, mesh, spec, (size, size, channels), classes)
  ids = jnp.arange(batch)
  args = ((params, None), samplers.example_keys(0, ids), ids % classes, jnp.ones(batch),
          samplers.GuidanceOptions.create(v=config.sample.v))
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  _, evaluations = compiled(*args)
  seconds = common.best_time(lambda: jax.block_until_ready(compiled(*args)), repeats=2)
  # XLA counts a loop's body once: FLOPs = one forward pass x network evaluations.
  x = jnp.zeros((batch, size, size, channels))
  forward = jax.jit(model.apply).lower({"params": params}, x, jnp.zeros(batch),
                                       jnp.zeros(batch, jnp.int32))
  flops = _flops(forward) * int(evaluations) / batch * _SAMPLE_BATCH.value
  return {"compile_s": compile_s, "batch_s": seconds, "evaluations": int(evaluations),
          "images_per_s": _SAMPLE_BATCH.value / seconds, "tflops": flops / seconds / 1e12}


def measure_inception() -> dict:
  """Images/s per chip of the FID Inception features (64x64 images resized to 299)."""
  chips = jax.local_device_count()
  batch = _INCEPTION_BATCH.value * chips
  model = inception.FIDInception(logits=True)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0),
                                  jnp.zeros((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3)))
  features = inception.InceptionFeatures(variables, batch_size=batch)
  images = np.random.default_rng(0).integers(0, 256, (batch, 64, 64, 3), np.uint8)
  start = time.perf_counter()
  features(images)
  compile_s = time.perf_counter() - start
  seconds = common.best_time(lambda: features(images), repeats=2)  # returns numpy
  apply = jax.jit(lambda v, x: model.apply(v, inception.preprocess(x)))
  flops = _flops(apply.lower(variables, jnp.zeros((batch, 64, 64, 3)))) / chips
  return {"compile_s": compile_s, "images_per_s": _INCEPTION_BATCH.value / seconds,
          "tflops": flops / seconds / 1e12}


def _hours(seconds: float) -> str:
  return f"{seconds / 3600:,.1f} h"


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  device = jax.devices()[0]
  chips = jax.device_count()
  peak = chip_peak(device.device_kind)
  print(f"JAX {jax.__version__} on {chips} x {device.device_kind} ({jax.default_backend()}); "
        f"{flags.FLAGS['config'].config_filename}, model dtype {config.model.dtype}", flush=True)
  started = time.perf_counter()
  trained = measure_training(config)
  print(f"training step compiled in {trained['compile_s']:.0f} s", flush=True)
  sampled = measure_sampler(config, trained.pop("state").ema_params)
  print(f"sampler compiled in {sampled['compile_s']:.0f} s", flush=True)
  featured = measure_inception()

  def of_peak(tflops: float) -> str:
    return f"{tflops / peak[0]:.1%}" if peak else "no peak on record"
  rows = [
      ["training step", f"{_PER_CHIP.value} per chip", f"{trained['images_per_s']:,.1f}",
       f"{trained['tflops']:.3g}", of_peak(trained["tflops"])],
      [f"{config.sweep.sampler} sampler, {config.sweep.num_steps} steps, "
       f"{sampled['evaluations']} evaluations", f"{_SAMPLE_BATCH.value} per chip",
       f"{sampled['images_per_s']:,.2f}", f"{sampled['tflops']:.3g}", of_peak(sampled["tflops"])],
      ["FID Inception features", f"{_INCEPTION_BATCH.value} per chip",
       f"{featured['images_per_s']:,.1f}", f"{featured['tflops']:.3g}",
       of_peak(featured["tflops"])],
  ]
  header = ["what", "batch", "images/s per chip", "TFLOP/s per chip", "of bf16 peak"]
  for row in [header, *rows]:
    print(" | ".join(row))
  print(f"bf16 peak: {f'{peak[0]:.0f} TFLOP/s ({peak[1]})' if peak else 'not on record'}")
  peak_bytes = trained["peak_bytes"]
  measured = (f"{peak_bytes / memory_plan.GiB:.2f} GiB" if peak_bytes
              else f"not reported on {jax.default_backend()}")
  print(f"peak device memory: {measured}; memory plan for the step: "
        f"{trained['plan_bytes'] / memory_plan.GiB:.2f} GiB", flush=True)

  # Projections from the rates above, on this machine's chips.
  train_s = _PAPER_STEPS.value * _PAPER_BATCH.value / trained["images_per_s"] / chips
  cells = len(config.sweep.guidance_weights)
  samples = cells * config.sweep.num_samples
  sweep_s = (samples / sampled["images_per_s"] + samples / featured["images_per_s"]) / chips
  projections = [
      [f"training, {_PAPER_STEPS.value:,} steps of batch {_PAPER_BATCH.value}",
       _hours(train_s), _hours(train_s * chips)],
      [f"Table-1 sweep: {cells} values of w x {config.sweep.num_samples:,} samples",
       _hours(sweep_s), _hours(sweep_s * chips)],
  ]
  for row in projections:
    print(f"projected {row[0]}: {row[1]} on {chips} chip(s) ({row[2]} chip-hours)")
  print(f"accelerator check done in {time.perf_counter() - started:.0f} s "
        f"(training loss {trained['loss']:.3f})")
  if _WRITE.value:
    title = f"Accelerator check: {chips} x {device.device_kind}"
    command = "python -m benchmarks.accelerator_check"
    common.record(title, command, header, rows, chip=device.device_kind)
    common.record(f"{title}, projected", command,
                  ["run", f"wall on {chips} chip(s)", "chip-hours"], projections,
                  chip=device.device_kind)


if __name__ == "__main__":
  app.run(main)
