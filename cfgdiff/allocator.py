"""jemalloc for CPU runs: XLA:CPU's per-call buffers cost a quarter of a step under glibc.

XLA:CPU allocates each executable's temporary buffer with malloc at every call and frees it
afterwards. glibc serves an allocation above 32 MB with a fresh ``mmap``, so every training
step page-faults that memory back in (the kernel zeroes each 4 KB page) and unmaps it again:
41,000 minor faults and about 60 ms of kernel time per step of the Fashion-MNIST default on
two cores. jemalloc told never to return freed pages (``dirty_decay_ms:-1``) reuses them:
no faults, and the step 1.2-1.3x faster (BENCHMARKS.md). Memory held stays at the peak of
one step, which a training process reaches anyway.

The allocator is fixed when the process starts (``LD_PRELOAD``), so ``cfgdiff.main``
re-executes itself once with jemalloc when it is installed (Debian/Ubuntu: ``apt-get install
libjemalloc2``; ``make setup`` does it). Only on hosts without an accelerator: the buffers
above are CPU-backend buffers, and the gain is measured only there. ``CFGDIFF_MALLOC=system``
keeps glibc's allocator; an allocator already in ``LD_PRELOAD`` (tcmalloc, as on some TPU
images) is left alone.
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import platform
import sys
from collections.abc import Mapping

# Freed pages are kept for reuse instead of returned (and faulted in again next step).
MALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
OPT_OUT = "CFGDIFF_MALLOC"  # "system": keep the C library's malloc
INSTALL_HINT = "sudo apt-get install libjemalloc2"
_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def find_jemalloc() -> str | None:
  """Path (or soname) of an installed libjemalloc.so.2, else None."""
  machine = platform.machine()
  for path in (f"/usr/lib/{machine}-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2",
               "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2"):
    if os.path.exists(path):
      return path
  return ctypes.util.find_library("jemalloc")


def accelerator_present(environ: Mapping[str, str]) -> bool:
  """True if JAX will run on a GPU or TPU here: their device nodes exist, or JAX_PLATFORMS
  names another platform first."""
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms and not platforms.startswith("cpu"):
    return True
  return any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES)


def preload_environment(environ: Mapping[str, str], jemalloc: str | None,
                        accelerator: bool) -> dict[str, str] | None:
  """The environment to re-execute with jemalloc preloaded, or None to run as is.

  None when: the user opted out (CFGDIFF_MALLOC=system), jemalloc is not installed, the
  host has an accelerator, or LD_PRELOAD already names an allocator (which is also how the
  re-executed process knows it is done).
  """
  preloaded = environ.get("LD_PRELOAD", "")
  if (environ.get(OPT_OUT, "").lower() == "system" or jemalloc is None or accelerator
      or any(name in preloaded for name in _ALLOCATORS)):
    return None
  env = dict(environ)
  env["LD_PRELOAD"] = f"{jemalloc}:{preloaded}" if preloaded else jemalloc
  env.setdefault("MALLOC_CONF", MALLOC_CONF)
  return env


def reexec_with_jemalloc() -> None:
  """Replaces this process with the same command under jemalloc, when preload_environment
  says so; returns otherwise. Call before any threads start (before importing JAX)."""
  if sys.platform != "linux":
    return
  env = preload_environment(os.environ, find_jemalloc(), accelerator_present(os.environ))
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def in_use() -> str:
  """One line for the log: which malloc this process runs, and how to get jemalloc if not."""
  try:
    with open("/proc/self/maps") as f:
      loaded = "libjemalloc" in f.read()
  except OSError:
    loaded = False
  if loaded:
    return f"jemalloc (MALLOC_CONF={os.environ.get('MALLOC_CONF', '')})"
  if os.environ.get(OPT_OUT, "").lower() == "system":
    return f"the C library's malloc ({OPT_OUT}=system)"
  if sys.platform == "linux" and not accelerator_present(os.environ) and find_jemalloc() is None:
    return ("the C library's malloc; CPU training steps run about 1.25x faster with "
            f"jemalloc: {INSTALL_HINT}")
  return "the C library's malloc"
