"""What the processes of a multi-host job exchange outside the jitted programs: shares of
work, exact gathers and sums, and process 0's decisions.

Every function here is collective (every process must call it, in the same order) and
costs nothing with one process. Arrays travel as raw bytes: with 64-bit types off, JAX's
own gathers would round float64 and int64 to 32 bits. Hosts that list a bucket or read a
file can see different things for a while; taking process 0's view (`agreed`) keeps them
on the same branch, so none of them waits forever in a collective the others skipped.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

# Bytes each process contributes to one all-gather: a reduction of a 2048 x 2048 float64
# sum then takes a few of them instead of process_count full copies at once.
GATHER_BYTES = 1 << 24


def process_share(n: int, index: int | None = None, count: int | None = None
                  ) -> tuple[int, int]:
  """[lo, hi): process ``index`` of ``count``'s contiguous share of n items (default:
  this process). Shares differ in size by at most one and cover 0..n-1 in order."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  return n * index // count, n * (index + 1) // count


def allgather(x: np.ndarray) -> np.ndarray:
  """[process_count, *x.shape]: ``x`` (the same shape everywhere) from every process,
  bit for bit."""
  x = np.ascontiguousarray(x)
  if jax.process_count() == 1:
    return x[None]
  raw = multihost_utils.process_allgather(x.reshape(-1).view(np.uint8))
  return np.asarray(raw).view(x.dtype).reshape((-1,) + x.shape)


def gather_rows(local: np.ndarray) -> list[np.ndarray]:
  """Every process's ``local`` [n_p, ...] in process order; n_p may differ (even be 0),
  the trailing shape is that of the longest."""
  if jax.process_count() == 1:
    return [local]
  shapes = allgather(np.asarray(local.shape, np.int64))
  rows = [int(r) for r in shapes[:, 0]]
  trailing = tuple(int(s) for s in shapes[int(np.argmax(rows)), 1:])
  padded = np.zeros((max(rows),) + trailing, local.dtype)
  if len(local):
    padded[:len(local)] = local
  step = max(1, GATHER_BYTES // max(1, padded[:1].nbytes))
  pieces = [allgather(padded[s:s + step]) for s in range(0, max(rows), step)]
  if not pieces:
    return [padded[:0] for _ in rows]
  full = np.concatenate(pieces, axis=1)
  return [full[p, :n] for p, n in enumerate(rows)]


def sum_over_processes(x: np.ndarray) -> np.ndarray:
  """The sum of ``x`` (the same shape everywhere) over processes, added in process order,
  so every process gets the same bits."""
  if jax.process_count() == 1:
    return x
  flat = np.ascontiguousarray(x).reshape(-1)
  out = np.empty_like(flat)
  step = max(1, GATHER_BYTES // flat.itemsize)
  for s in range(0, len(flat), step):
    gathered = allgather(flat[s:s + step])
    total = gathered[0].copy()
    for row in gathered[1:]:
      total += row
    out[s:s + step] = total
  return out.reshape(x.shape)


def broadcast(x: np.ndarray) -> np.ndarray:
  """Process 0's ``x`` [n, ...] on every process, bit for bit; the others pass any array
  of the same dtype and rank (e.g. an empty one)."""
  return gather_rows(x if jax.process_index() == 0 else x[:0])[0]


def agreed(value: Any) -> Any:
  """Process 0's ``value`` (anything JSON can hold) on every process."""
  if jax.process_count() == 1:
    return value
  payload = np.frombuffer(json.dumps(value).encode(), np.uint8)
  return json.loads(broadcast(payload).tobytes().decode())


def any_process(flag: bool) -> bool:
  """True on every process when ``flag`` is True on any of them."""
  return bool(allgather(np.array([flag])).any())
