"""FSDP over a node's devices however the processes were started: the node layout from
host names, and 2 "nodes" x 2 processes x 1 device training like 1 process x 4 devices
on the same (data 2, fsdp 2) mesh."""

import pytest

from cfgdiff import configs, topology
from tests.conftest import (
  SMALLEST_UNET,
  TINY_CONFIG,
  max_abs_difference,
  run_cli,
  run_cli_processes,
)
from tests.test_train import _final_state


@pytest.mark.parametrize("hosts,counts,per_node", [
    (["a"] * 8, [1] * 8, 8),  # SLURM, one process per GPU on one 8-GPU node
    (["a", "a", "b", "b"], [1] * 4, 2),  # 2 nodes x 2 processes
    (["a", "b"], [8, 8], 8),  # one process per node
    (["a", "a", "b"], [2, 2, 4], 4),  # mixed, yet every node has 4
])
def test_devices_per_node_counts_every_process_on_the_node(hosts, counts, per_node):
  assert topology.devices_per_node(hosts, counts) == per_node


def test_processes_of_a_node_numbered_apart_are_refused_with_the_fix():
  with pytest.raises(configs.ConfigError, match="--distribution=block"):
    topology.devices_per_node(["a", "b", "a", "b"], [1] * 4)


def test_nodes_of_different_sizes_are_refused_with_the_fix():
  with pytest.raises(configs.ConfigError, match=r"mesh_shape=\(-1,N\)"):
    topology.devices_per_node(["a", "a", "b"], [1, 1, 1])


def test_two_nodes_of_two_processes_shard_like_one_process_of_four_devices(
    synthetic_data, tmp_path):
  common = [f"--config={TINY_CONFIG}", f"--config.data.path={synthetic_data}",
            "--config.model.dropout=0.0", "--config.train.num_steps=4", *SMALLEST_UNET]
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  proc = run_cli(*common, f"--workdir={single}", "--config.runtime.cpu_devices=4",
                 "--config.runtime.mesh_shape=(2,2)")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mesh data 2 x fsdp 2" in proc.stderr
  # fsdp = 0: "one node's devices", each process seeing only its own device.
  logs = run_cli_processes(4, *common, f"--workdir={multi}", "--config.runtime.mesh_shape=(-1,0)",
                           log_dir=str(tmp_path / "logs"),
                           hostnames=["node-a", "node-a", "node-b", "node-b"])
  assert all("mesh data 2 x fsdp 2" in log for log in logs), logs[0][-3000:]
  a, b = (_final_state(w, 4, synthetic_data) for w in (single, multi))
  # Gloo sums in another order than in-process all-reduce: float rounding only (the bound
  # of tests/test_multiprocess.py); a wrong layout moves parameters by whole steps.
  worst = max_abs_difference(a, b)
  assert worst < 3e-4, worst
