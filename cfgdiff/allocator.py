"""jemalloc for CPU runs: under glibc, XLA:CPU page-faults its buffers in at every step.

XLA:CPU allocates each executable's temporary buffer with malloc at every call and frees it
afterwards. glibc serves an allocation above 32 MB with a fresh ``mmap``, so every training
step page-faults that memory back in (the kernel zeroes each 4 KB page) and unmaps it again:
41,000 minor faults and about 60 ms of kernel time per step of the Fashion-MNIST default on
two cores. jemalloc told never to return freed pages (``dirty_decay_ms:-1``) reuses them: no
faults; training steps 1.1-1.25x faster (``python -m benchmarks.malloc``), the main job's
training loop 1.3x (BENCHMARKS.md). The memory the process holds stays at the peak it reached.

The allocator is fixed when the process starts (``LD_PRELOAD``), so ``cfgdiff.main``
re-executes itself once with jemalloc when it is installed (Debian/Ubuntu: ``apt-get install
libjemalloc2``; ``make setup`` does it). Only on hosts without an accelerator: the buffers
above are CPU-backend buffers, and the gain is measured only there. ``CFGDIFF_MALLOC=system``
keeps the C library's malloc; an allocator already in ``LD_PRELOAD`` (tcmalloc, as on some
TPU images) is left alone.
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import sys
from collections.abc import Mapping

# Freed pages are kept for reuse instead of returned (and faulted in again next step).
MALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
CHOICE = "CFGDIFF_MALLOC"  # "jemalloc" (the default) or "system"
CHOICES = ("jemalloc", "system")
INSTALL_HINT = "sudo apt-get install libjemalloc2"
ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")  # names a preload of one contains
REEXECUTED = "CFGDIFF_MALLOC_REEXECUTED"  # set in the re-executed process: never twice
_ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/kfd")


class AllocatorError(ValueError):
  """CFGDIFF_MALLOC holds a value other than CHOICES."""


def choice(environ: Mapping[str, str]) -> str:
  """The allocator CFGDIFF_MALLOC asks for; unset means jemalloc."""
  value = environ.get(CHOICE, "").strip().lower() or "jemalloc"
  if value not in CHOICES:
    raise AllocatorError(f"{CHOICE}={environ[CHOICE]!r} is invalid: must be one of {CHOICES} "
                         "(unset means jemalloc where installed).")
  return value


def find_jemalloc() -> str | None:
  """Path (or soname) of an installed libjemalloc.so.2, else None."""
  for path in (f"/usr/lib/{os.uname().machine}-linux-gnu/libjemalloc.so.2",
               "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2",
               "/usr/local/lib/libjemalloc.so.2"):
    if os.path.exists(path):
      return path
  return ctypes.util.find_library("jemalloc")


def accelerator_present(environ: Mapping[str, str]) -> bool:
  """True if JAX will run on a GPU or TPU here: JAX_PLATFORMS names another platform first,
  or, when it is unset, their device nodes exist (CUDA, TPU, ROCm)."""
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:  # the user's choice wins over what the host has
    return not platforms.startswith("cpu")
  return any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES)


def retains_freed_pages(malloc_conf: str) -> bool:
  """Whether jemalloc configured by MALLOC_CONF keeps freed pages (dirty_decay_ms:-1, the
  last setting winning as in jemalloc)."""
  dirty = None
  for option in malloc_conf.split(","):
    key, _, value = option.partition(":")
    if key.strip() == "dirty_decay_ms":
      dirty = value.strip()
  return dirty == "-1"


def preload_environment(environ: Mapping[str, str], jemalloc: str | None,
                        accelerator: bool) -> dict[str, str] | None:
  """The environment to re-execute with jemalloc preloaded, or None to run as is.

  None when: CFGDIFF_MALLOC=system, jemalloc is not installed, the host has an accelerator,
  LD_PRELOAD already names an allocator, or this process is the re-executed one.
  Raises AllocatorError for a CFGDIFF_MALLOC value outside CHOICES.
  """
  preloaded = environ.get("LD_PRELOAD", "")
  if (choice(environ) == "system" or jemalloc is None or accelerator or environ.get(REEXECUTED)
      or any(name in preloaded for name in ALLOCATORS)):
    return None
  env = dict(environ)
  env["LD_PRELOAD"] = f"{jemalloc}:{preloaded}" if preloaded else jemalloc
  # A user's MALLOC_CONF comes after ours: where both set an option, theirs wins.
  user_conf = environ.get("MALLOC_CONF", "")
  env["MALLOC_CONF"] = (user_conf if user_conf.startswith(MALLOC_CONF)
                        else f"{MALLOC_CONF},{user_conf}" if user_conf else MALLOC_CONF)
  env[REEXECUTED] = "1"
  return env


def _this_host_environment() -> dict[str, str] | None:
  """preload_environment for this process's environment, on Linux only."""
  if sys.platform != "linux":
    return None
  return preload_environment(os.environ, find_jemalloc(), accelerator_present(os.environ))


def reexec_with_jemalloc() -> None:
  """Replaces this process with the same command under jemalloc when preload_environment
  says so; returns otherwise, also if the exec fails. Call before any threads start (before
  importing JAX). Raises AllocatorError for a bad CFGDIFF_MALLOC."""
  env = _this_host_environment()
  # Only a command that can run again as it is: not `python -c ...` or a script on stdin.
  if env is None or sys.argv[0] in ("", "-", "-c"):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError as error:
    print(f"cfgdiff: could not re-execute under jemalloc ({error}); running on the C "
          "library's malloc.", file=sys.stderr)


def in_use(maps: str | None = None) -> str:
  """One line for the log: which malloc this process runs; on a CPU host, how to get
  jemalloc if it is missing, or the MALLOC_CONF to add if a preloaded one lacks ours.

  Args:
    maps: the text of /proc/self/maps (the libraries loaded); read when None.
  """
  if maps is None:
    try:
      with open("/proc/self/maps") as f:
        maps = f.read()
    except OSError:
      maps = ""
  for name in ALLOCATORS:
    if f"lib{name}" in maps:
      if name != "jemalloc":
        return name
      conf = os.environ.get("MALLOC_CONF", "")
      if retains_freed_pages(conf) or accelerator_present(os.environ):
        return f"jemalloc (MALLOC_CONF={conf})"
      # A jemalloc the user preloaded without our options: it returns XLA's buffers.
      return (f"jemalloc (MALLOC_CONF={conf}), returning freed pages to the system, so "
              f"XLA:CPU faults its buffers in again at every step: add {MALLOC_CONF} to "
              "MALLOC_CONF for 1.1-1.3x faster CPU training")
  if choice(os.environ) == "system":
    return f"the C library's malloc ({CHOICE}=system)"
  if sys.platform == "linux" and not accelerator_present(os.environ) and find_jemalloc() is None:
    return ("the C library's malloc; CPU training runs 1.1-1.3x faster with jemalloc: "
            f"{INSTALL_HINT}")
  return "the C library's malloc"


def main(argv: list[str]) -> None:
  """``python -m cfgdiff.allocator COMMAND [ARGS...]``: runs COMMAND under jemalloc wherever
  ``cfgdiff.main`` would (``make test`` runs pytest so, for the tests that run JAX in
  pytest's own process)."""
  if not argv:
    sys.exit("usage: python -m cfgdiff.allocator COMMAND [ARGS...]")
  try:
    env = _this_host_environment()
  except AllocatorError as error:
    print(f"cfgdiff: error: {error}", file=sys.stderr)
    sys.exit(2)
  os.execvpe(argv[0], argv, env if env is not None else dict(os.environ))


if __name__ == "__main__":
  main(sys.argv[1:])
