"""Shared helpers for benchmarks: run a variant in a fresh process, record its table in the
results log that BENCHMARKS.md is built from (benchmarks/page.py)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every table a benchmark measured, one JSON object per line, oldest first. Set
# CFGDIFF_BENCHMARK_LOG to record elsewhere (a test, or a run whose numbers should not land).
RESULTS_LOG = os.path.join(ROOT, "benchmarks", "results.jsonl")
# The vector extensions that decide XLA:CPU's and oneDNN's speed, in the order listed.
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni",
                "avx512_bf16", "amx_bf16")


def cpu_description() -> tuple[str, str]:
  """(CPU model name, the vector extensions it has among VECTOR_FLAGS), from /proc/cpuinfo."""
  model, flags = platform.processor() or "unknown", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          model = value.strip()
        elif key.strip() == "flags":
          flags = set(value.split())
  except OSError:
    pass
  return model, " ".join(v for v in VECTOR_FLAGS if v in flags) or "-"


def best_time(fn: Callable[[], object], repeats: int) -> float:
  """Seconds of the fastest of ``repeats`` calls of ``fn`` after one warm-up call: on
  shared cores the minimum is the least disturbed by other tenants."""
  fn()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def initial_params(config) -> dict:
  """The U-Net parameters of ``config`` at PRNGKey(0): the weights every JAX-vs-PyTorch
  comparison gives both frameworks."""
  import jax
  import jax.numpy as jnp

  from cfgdiff import build
  size, channels = config.data.image_size, config.data.channels
  return build.make_model(config).init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels)), jnp.zeros(1),
      jnp.zeros(1, jnp.int32))["params"]


def torch_network(config):  # -> benchmarks.torch_unet.TorchUNet
  """The PyTorch port of ``config``'s U-Net with initial_params' weights: the network every
  JAX-vs-PyTorch comparison times on the PyTorch side."""
  import jax

  from benchmarks.torch_unet import TorchUNet
  mc = config.model
  return TorchUNet(jax.device_get(initial_params(config)), mc.ch, mc.ch_mult,
                   mc.num_res_blocks, mc.attn_resolutions, mc.head_channels, mc.num_heads)


def train_setup(config) -> tuple:  # (Mesh, UNet, optax transform, TrainState, dict)
  """(mesh, model, optimizer, fresh TrainState, a random global batch) for ``config``'s
  training at config.train.batch_size, over every device: what a benchmark of the
  training step starts from."""
  import numpy as np

  from cfgdiff import build
  mesh = build.make_mesh()
  model, optimizer = build.make_model(config), build.make_optimizer(config.train)
  state = build.create_state(config, model, optimizer, mesh)
  rng = np.random.default_rng(0)
  batch, size, channels = config.train.batch_size, config.data.image_size, config.data.channels
  images = build.global_batch({
      "image": rng.uniform(-1, 1, (batch, size, size, channels)).astype(np.float32),
      "label": rng.integers(0, config.data.num_classes, batch).astype(np.int32)}, mesh)
  return mesh, model, optimizer, state, images


def comparison_setup(config) -> tuple:  # (Mesh, UNet, optax transform, TrainState, dict)
  """train_setup with the state's parameters set to initial_params: what a JAX-vs-PyTorch
  comparison starts from, PyTorch getting the same weights (common.torch_network)."""
  import jax
  mesh, model, optimizer, state, images = train_setup(config)
  state = state.replace(params=jax.device_put(initial_params(config), jax.tree.map(
      lambda x: x.sharding, state.params)))
  return mesh, model, optimizer, state, images


def training_step(config, model, optimizer, mesh, state, batch) -> tuple:  # (Compiled, bool)
  """The train step `cfgdiff.main` trains ``config`` with on this machine, compiled:
  train.kernel_gradient resolved as training resolves it ("auto" times both convolution
  kernel gradients here and keeps the faster); and whether that is conv.py's tap products."""
  import jax

  from cfgdiff import kernel_choice
  with tempfile.TemporaryDirectory(prefix="cfgdiff_benchmark_") as workdir:
    step = kernel_choice.compile_train_step(config, model, optimizer, mesh, state, workdir)
    taps = kernel_choice.saved_kernel_gradient(workdir) == "taps"
  if not isinstance(step, jax.stages.Compiled):
    step = step.lower(state, batch).compile()
  return step, taps


def spmd_train_step(config, model, optimizer, mesh, state, batch):  # -> jax.stages.Compiled
  """The train step compiled with XLA's SPMD gradient all-reduce, whatever the CPU would
  choose: benchmarks count the step's FLOPs on it, because XLA's cost analysis counts the
  flat step's shard_map body differently (13% more FLOPs, 6.8x the bytes, while it runs
  faster; BENCHMARKS.md)."""
  from cfgdiff import train_step
  return train_step.compile_train_step(config, model, optimizer, mesh, flat_allreduce=False
                                       ).lower(state, batch).compile()


def worker_env(devices: int, extra_xla_flags: str = "", malloc: str = "jemalloc") -> dict:
  """Environment of a benchmark worker process with ``devices`` CPU devices. ``malloc``:
  "jemalloc" preloads it as `cfgdiff.main` does on a CPU host, "system" runs the C
  library's malloc; any allocator this process inherited is dropped first."""
  from cfgdiff import allocator
  if malloc not in allocator.CHOICES:
    raise ValueError(f"malloc={malloc!r}: must be one of {allocator.CHOICES}")
  env = {k: v for k, v in os.environ.items() if k not in (allocator.CHOICE, allocator.REEXECUTED)}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {extra_xla_flags}"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  env["LD_PRELOAD"] = ":".join(p for p in env.get("LD_PRELOAD", "").split(":")
                               if p and not any(name in p for name in allocator.ALLOCATORS))
  if malloc == "system":
    return env
  jemalloc = allocator.find_jemalloc()
  if jemalloc is None:
    raise RuntimeError(f"jemalloc is not installed ({allocator.INSTALL_HINT})")
  return allocator.preload_environment(env, jemalloc, accelerator=False)


def run_variant(module: str, variant: dict, devices: int, extra_xla_flags: str = "",
                malloc: str = "jemalloc") -> dict:
  """Runs ``python -m module --worker JSON`` with ``devices`` CPU devices under ``malloc``
  (see worker_env); returns its JSON."""
  env = worker_env(devices, extra_xla_flags, malloc)
  out = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(variant)],
                       cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    raise RuntimeError(f"variant {variant} failed:\n{out.stderr[-3000:]}")
  result = json.loads(out.stdout.strip().splitlines()[-1])
  if "malloc" in result and result["malloc"].startswith("jemalloc") != (malloc == "jemalloc"):
    raise RuntimeError(f"variant {variant} ran under {result['malloc']}, not {malloc}")
  return result


def results_log() -> str:
  """The results log benchmarks record into: CFGDIFF_BENCHMARK_LOG, else RESULTS_LOG."""
  return os.environ.get("CFGDIFF_BENCHMARK_LOG") or RESULTS_LOG


def record(title: str, command: str, header: list[str], rows: list[list],
           notes: list[str] = (), chip: str | None = None) -> dict:
  """Appends one measured table to the results log and prints it as markdown.

  Args:
    title: what was measured; benchmarks/page.py files the table under the page section
      whose title it starts with.
    command: the command that measured it, as a reader would rerun it.
    header, rows: the table; cells are written as strings.
    notes: lines of reading computed by the benchmark (ratios), printed under the table.
    chip: the accelerator's device_kind, where the numbers are an accelerator's.

  Returns:
    The record as written: its date and the CPU model and vector extensions it ran on.
  """
  model, vector = cpu_description()
  entry = {"title": title, "date": datetime.date.today().isoformat(), "command": command,
           "cores": os.cpu_count(), "cpu": model, "vector": vector, "chip": chip,
           "header": [str(h) for h in header], "rows": [[str(c) for c in row] for row in rows],
           "notes": list(notes)}
  with open(results_log(), "a") as f:
    f.write(json.dumps(entry) + "\n")
  print("\n".join(markdown_table(entry["header"], entry["rows"]) + entry["notes"]))
  print(f"recorded in {results_log()}; `python -m benchmarks.page` rebuilds BENCHMARKS.md")
  return entry


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
  """The lines of a markdown table."""
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(row) + " |" for row in rows])
