"""Shared fixtures: synthetic IDX data, the tiny config, and a runner for the real CLI."""

from __future__ import annotations

import gzip
import os
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from cfgdiff import sources

# XLA:CPU's LLVM at -O1 instead of its default -O2: the tests' programs compile 1.5-2.5x
# faster and run as fast (the tests' own compiles, timed both ways). Set here for this
# process and, through xla_flags(), for every process a test starts.
FAST_COMPILE = "--xla_backend_optimization_level=1"


def xla_flags(*extra: str) -> str:
  """XLA_FLAGS for a process a test starts: FAST_COMPILE and ``extra``."""
  return " ".join((FAST_COMPILE, *extra))


if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

# The longest modules first (minutes each), so that `pytest -n 2` does not end on one of
# them while the other worker idles.
RUN_FIRST = ("test_rehearsal", "test_train", "test_faults", "test_multiprocess", "test_sweep",
             "test_tfds", "test_topology", "test_samplers", "test_sampling_cli",
             "test_readme_commands")


def pytest_configure(config):
  config.addinivalue_line("markers", "rehearsal: the end-to-end ImageNet pod/SLURM rehearsal "
                          "(make rehearse runs these alone; CI runs them with the rest)")


def pytest_collection_modifyitems(config, items):
  """Orders modules longest first, for `pytest -n 2 --dist loadfile --no-loadscope-reorder`
  (make test): each module runs on one worker, so its module-scoped fixtures (a trained
  workdir, a compile) are built once, and the two rehearsals never run at the same time."""
  del config
  def module_name(item):
    return item.module.__name__.rsplit(".", 1)[-1]
  rank = {name: i for i, name in enumerate(RUN_FIRST)}
  items.sort(key=lambda item: rank.get(module_name(item), len(rank)))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "tests", "tiny_config.py")


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes a uint8 array as a gzipped IDX file (the Fashion-MNIST format)."""
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def make_synthetic_dataset(folder: str, n: int = 256, size: int = 8, classes: int = 4) -> str:
  """Writes an IDX train/test set where class k is a bright k-th quadrant on noise."""
  rng = np.random.default_rng(0)
  labels = rng.integers(0, classes, n).astype(np.uint8)
  images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
  half = size // 2
  for i, k in enumerate(labels):
    r, c = divmod(int(k) % 4, 2)
    images[i, r * half:(r + 1) * half, c * half:(c + 1) * half] = 230
  os.makedirs(folder, exist_ok=True)
  for image_file, label_file in sources.FASHION_MNIST_FILES.values():
    write_idx(os.path.join(folder, image_file), images)
    write_idx(os.path.join(folder, label_file), labels)
  return folder


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> str:
  return make_synthetic_dataset(str(tmp_path_factory.mktemp("data")))


@pytest.fixture
def tiny_config(synthetic_data):
  from tests import tiny_config
  config = tiny_config.get_config()
  config.data.path = synthetic_data
  return config


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
  """Runs ``python -m cfgdiff.main ARGS`` as a user would; returns the finished process."""
  full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
  return subprocess.run([sys.executable, "-m", "cfgdiff.main", *args], cwd=ROOT, env=full_env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def wait_for(condition, timeout: float, what: str, interval: float = 1.0,
             proc: subprocess.Popen | None = None):
  """``condition()``'s first truthy value, polled every ``interval`` s; an AssertionError
  naming ``what`` after ``timeout`` s, or at once if ``proc`` exits first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    value = condition()
    if value:
      return value
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f"the job exited {proc.returncode} before {what}")
    time.sleep(interval)
  raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# One level, no attention: several processes compile it on two cores in a fraction of the
# tiny config's time; for tests of process layout, where the network does not matter.
SMALLEST_UNET = ["--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()"]


def max_abs_difference(a, b) -> float:
  """The largest |a - b| over two pytrees of arrays of the same structure."""
  import jax  # pylint: disable=g-import-not-at-top
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _as_host(name: str, folder: str) -> list[str]:
  """A command prefix that runs its command as host ``name``: its own UTS namespace, and
  a mount namespace whose /etc/hosts resolves ``name`` (Gloo looks its host name up)."""
  hosts = os.path.join(folder, f"hosts.{name}")
  with open("/etc/hosts") as f, open(hosts, "w") as out:
    out.write(f.read() + f"\n127.0.0.1 {name}\n")
  return ["unshare", "--uts", "--mount", "sh", "-c",
          f'hostname "$0" && mount --bind {hosts} /etc/hosts && exec "$@"', name]


def start_cli_processes(num_processes: int, *args: str, log_dir: str,
                        hostnames: list[str] | None = None) -> list[subprocess.Popen]:
  """Starts the CLI as ``num_processes`` cooperating JAX processes on this host.

  Each process calls jax.distributed.initialize against a coordinator on a free local
  port and owns one CPU device; collectives between them go over Gloo, as between hosts.
  Process i writes its console to ``log_dir/process_{i}.log`` (files, so that no pipe
  fills up and stalls a process). With ``hostnames``, process i runs in its own UTS
  namespace named hostnames[i]: processes with one name are one "node".
  """
  coordinator = f"localhost:{free_port()}"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  os.makedirs(log_dir, exist_ok=True)
  procs = []
  for i in range(num_processes):
    with open(os.path.join(log_dir, f"process_{i}.log"), "w") as log:
      node = _as_host(hostnames[i], log_dir) if hostnames else []
      procs.append(subprocess.Popen(
          [*node, sys.executable, "-m", "cfgdiff.main", *args, "--config.runtime.cpu_devices=1",
           "--multihost", f"--coordinator_address={coordinator}",
           f"--num_processes={num_processes}", f"--process_id={i}"],
          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log))
  return procs


def wait_cli_processes(procs: list[subprocess.Popen], log_dir: str, timeout: int = 600,
                       expected_code: int = 0) -> list[str]:
  """Waits for processes from `start_cli_processes`; checks every exit status is
  ``expected_code``; returns their consoles (stderr)."""
  try:
    for proc in procs:
      proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    for proc in procs:
      proc.kill()
    raise
  logs = []
  for i, proc in enumerate(procs):
    with open(os.path.join(log_dir, f"process_{i}.log")) as f:
      logs.append(f.read())
    assert proc.returncode == expected_code, f"process {i} exited {proc.returncode}:\n" + (
        logs[-1][-3000:])
  return logs


def run_cli_processes(num_processes: int, *args: str, log_dir: str, timeout: int = 600,
                      hostnames: list[str] | None = None) -> list[str]:
  """Runs `start_cli_processes` to the end; returns each process's console (stderr)."""
  procs = start_cli_processes(num_processes, *args, log_dir=log_dir, hostnames=hostnames)
  return wait_cli_processes(procs, log_dir, timeout)
