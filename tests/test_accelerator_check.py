"""The accelerator check runs as a user runs it (`python -m benchmarks.accelerator_check`),
here on CPU with the tiny config, and prints every figure it promises."""

import os
import re
import subprocess
import sys

from benchmarks import accelerator_check
from tests.conftest import ROOT, TINY_CONFIG, xla_flags


def test_accelerator_check_runs_on_cpu_and_prints_rates_memory_and_projections():
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.accelerator_check", f"--config={TINY_CONFIG}",
       "--nowrite", "--per_chip_batch=4", "--steps=2", "--sample_batch=4",
       "--inception_batch=2", "--config.sweep.num_steps=4", "--config.sweep.num_samples=100"],
      cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
      env=os.environ | {"XLA_FLAGS": xla_flags(), "TF_CPP_MIN_LOG_LEVEL": "3",
                        "JAX_PLATFORMS": "cpu"})
  out = proc.stdout
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {line.split(" | ")[0]: line.split(" | ") for line in out.splitlines() if " | " in line}
  for what in ("training step", "FID Inception features"):
    images_per_s, tflops = float(rows[what][2].replace(",", "")), float(rows[what][3])
    assert images_per_s > 0 and tflops > 0, rows[what]
  sampler = next(row for key, row in rows.items() if key.startswith("ancestral sampler"))
  assert "4 steps, 8 evaluations" in sampler[0], sampler  # both guidance passes per step
  assert "no peak on record" in sampler[4]  # a CPU is in no peak table
  assert re.search(r"peak device memory: not reported on cpu; memory plan for the step: "
                   r"\d+\.\d\d GiB", out), out
  train_hours = float(re.search(r"projected training, 400,000 steps of batch 2048: "
                                r"([\d,.]+) h", out).group(1).replace(",", ""))
  assert train_hours > 0, out
  assert "Table-1 sweep: " in out and "done in" in out


def test_peak_table_names_the_chips_by_jax_device_kind():
  assert accelerator_check.chip_peak("NVIDIA H100 80GB HBM3")[0] == 989.0
  assert accelerator_check.chip_peak("NVIDIA H100 PCIe")[0] == 756.0
  assert accelerator_check.chip_peak("NVIDIA A100-SXM4-80GB")[0] == 312.0
  assert accelerator_check.chip_peak("TPU v5 lite")[0] == 197.0
  assert accelerator_check.chip_peak("TPU v5p")[0] == 459.0
  assert accelerator_check.chip_peak("cpu") is None
