"""Feature networks run in fixed-size batches over this process's devices: one compiled
shape whatever the number of images, the last batch padded and the padding dropped."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def local_shardings(batch_size: int) -> tuple[NamedSharding, NamedSharding]:
  """(batch split, replicated) over this process's devices: data parallel on one host
  (each core is an XLA device on CPU), the same numbers on any device count. One device
  when ``batch_size`` does not split evenly."""
  devices = jax.local_devices()
  if batch_size % len(devices):
    devices = devices[:1]
  mesh = Mesh(np.asarray(devices), ("batch",))
  return NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())


def in_fixed_batches(apply: Callable[[np.ndarray], tuple], images: np.ndarray,
                     batch_size: int, empty: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
  """``apply`` on ``images`` [N, ...] in batches of exactly ``batch_size`` (the last one
  padded with copies of its first image), outputs [N, ...] concatenated; ``empty`` (arrays
  of 0 rows) is what N = 0 returns (a process whose devices drew none of a chunk)."""
  outputs = [[e] for e in empty]
  for start in range(0, len(images), batch_size):
    chunk = np.asarray(images[start:start + batch_size])
    padded = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk), 0)])
    for out, value in zip(outputs, apply(padded), strict=True):
      out.append(np.asarray(value)[:len(chunk)])
  return tuple(np.concatenate(out) for out in outputs)
