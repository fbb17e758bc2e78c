"""Which processes share a node, so that FSDP's default width is a node's devices however
the cluster started the processes: one per GPU (SLURM's usual), one per node, one per TPU
host.

A node is a host name. Its devices are the local devices of every process that runs there.
"""

from __future__ import annotations

import functools
import socket

import numpy as np

from cfgdiff import configs

_NAME_BYTES = 64  # HOST_NAME_MAX on Linux


def devices_per_node(hosts: list[str], local_counts: list[int]) -> int:
  """The device count of every node, given each process's host and local device count
  (in process order).

  Raises ConfigError when nodes hold different device counts, or when a node's processes
  are not numbered contiguously (SLURM's --distribution=cyclic): a mesh row of one node's
  devices would then span nodes.
  """
  nodes: dict[str, list[int]] = {}
  for process, host in enumerate(hosts):
    nodes.setdefault(host, []).append(process)
  for host, processes in nodes.items():
    if processes != list(range(processes[0], processes[-1] + 1)):
      raise configs.ConfigError(
          f"the processes on node {host} are {processes}, not numbered contiguously, so "
          "runtime.mesh_shape's fsdp = 0 (one node's devices) cannot be laid out: start the "
          "job with SLURM's --distribution=block (its default), or set "
          "--config.runtime.mesh_shape=(-1,N) with N devices per shard group.")
  counts = {host: sum(local_counts[p] for p in processes) for host, processes in nodes.items()}
  if len(set(counts.values())) != 1:
    raise configs.ConfigError(
        f"nodes hold different device counts {counts}: runtime.mesh_shape's fsdp = 0 (one "
        "node's devices) is ambiguous; set --config.runtime.mesh_shape=(-1,N) with N "
        "dividing every node's count.")
  return next(iter(counts.values()))


@functools.cache
def layout() -> tuple[tuple[str, ...], tuple[int, ...]]:
  """(host of each process, local device count of each process): a collective the first
  time every process calls it, cached after."""
  import jax  # pylint: disable=g-import-not-at-top

  from cfgdiff import multihost  # pylint: disable=g-import-not-at-top
  name = socket.gethostname().encode()[:_NAME_BYTES]
  mine = np.zeros(_NAME_BYTES + 4, np.uint8)
  mine[:len(name)] = np.frombuffer(name, np.uint8)
  mine[_NAME_BYTES:] = np.frombuffer(np.int32(jax.local_device_count()).tobytes(), np.uint8)
  rows = multihost.allgather(mine)
  hosts = tuple(bytes(r[:_NAME_BYTES]).rstrip(b"\0").decode(errors="replace") for r in rows)
  counts = tuple(int(np.frombuffer(bytes(r[_NAME_BYTES:]), np.int32)[0]) for r in rows)
  return hosts, counts


def node_device_count() -> int:
  """This job's devices per node (collective the first time; see `devices_per_node`)."""
  hosts, counts = layout()
  return devices_per_node(list(hosts), list(counts))
