"""Which accelerator this machine has, which JAX build fits it, and the start-up check
that JAX really runs on it.

`pip install jax` is the CPU build: on a GPU or TPU machine without the matching extra
(`cfgdiff[cuda12]`, `cfgdiff[cuda13]`, `cfgdiff[tpu]`) JAX falls back to the CPU with one
warning and training takes days instead of hours. `start_up` logs what JAX runs on and
refuses that fallback unless the user asked for the CPU (JAX_PLATFORMS=cpu).

The standard library alone is imported here, so the Makefile and launch/ scripts ask this
file which build to install before cfgdiff's environment exists (with any python3,
even the 3.10 of a stock TPU VM image):

  python3 cfgdiff/backend.py [--pci-devices=DIR] choose [cpu|cuda12|cuda13|tpu]
      prints the build to install (detected when none is named), or `error: ...`
  python3 cfgdiff/backend.py [--pci-devices=DIR] describe
      prints what was detected, in words
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
import subprocess
import sys

ACCELERATORS = ("cpu", "cuda12", "cuda13", "tpu")

# JAX's CUDA wheels need at least these NVIDIA drivers (JAX's installation page; CUDA 13.0
# shipped with the R580 driver). A newer driver runs the older CUDA too.
CUDA12_MIN_DRIVER = (525, 60, 13)
CUDA13_MIN_DRIVER = (580,)

# How JAX itself finds TPU chips (jax/_src/hardware_utils.py): PCI devices of Google's
# vendor id with a TPU device id. /dev/accel* (v4) and /dev/vfio (v5e and later) differ by
# generation; the PCI ids cover every generation JAX knows.
PCI_DEVICES = "/sys/bus/pci/devices"
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_PCI_DEVICES = {"0x0027": "v3", "0x0056": "plc", "0x005e": "v4", "0x0062": "v5p",
                   "0x0063": "v5e", "0x006f": "v6e", "0x0076": "tpu7x"}

# The distributions each accelerator extra adds (what `cfgdiff[...]` pulls in via jax).
PLUGINS = {"cuda12": "jax-cuda12-plugin", "cuda13": "jax-cuda13-plugin", "tpu": "libtpu"}


@dataclasses.dataclass(frozen=True)
class Machine:
  """What this machine has: NVIDIA GPUs (names from `nvidia-smi -L`), the driver version,
  and TPU chips (by generation, from PCI)."""
  gpus: tuple[str, ...] = ()
  driver: tuple[int, ...] | None = None
  tpu_chips: tuple[str, ...] = ()

  def describe(self) -> str:
    if self.gpus:
      names = ", ".join(sorted(set(self.gpus)))
      driver = ".".join(map(str, self.driver)) if self.driver else "unknown"
      return f"{len(self.gpus)} NVIDIA GPU(s) ({names}; driver {driver}) listed by nvidia-smi"
    if self.tpu_chips:
      return f"{len(self.tpu_chips)} TPU {self.tpu_chips[0]} chip(s) on PCI"
    return "no NVIDIA GPU (nvidia-smi) and no TPU (PCI)"


def parse_nvidia_smi_list(listing: str) -> tuple[str, ...]:
  """GPU names from `nvidia-smi -L` output ("GPU 0: NVIDIA H200 (UUID: GPU-...)")."""
  return tuple(m.group(1).strip() for m in
               re.finditer(r"^GPU \d+: (.+?)(?: \(UUID: [^)]*\))?\s*$", listing, re.M))


def parse_driver_version(text: str) -> tuple[int, ...] | None:
  """The driver version from `nvidia-smi --query-gpu=driver_version --format=csv,noheader`
  (one line per GPU, e.g. "580.65.06"); None when there is none."""
  m = re.search(r"^\s*(\d+(?:\.\d+)*)\s*$", text, re.M)
  return tuple(int(x) for x in m.group(1).split(".")) if m else None


def tpu_chips(pci_devices: str = PCI_DEVICES) -> tuple[str, ...]:
  """The TPU generation of each TPU chip under ``pci_devices`` (JAX's own test)."""
  chips = []
  try:
    names = sorted(os.listdir(pci_devices))
  except OSError:
    return ()
  for name in names:
    try:
      with open(os.path.join(pci_devices, name, "vendor")) as f:
        vendor = f.read().strip()
      if vendor != GOOGLE_PCI_VENDOR:
        continue
      with open(os.path.join(pci_devices, name, "device")) as f:
        device = f.read().strip()
    except OSError:
      continue
    if device in TPU_PCI_DEVICES:
      chips.append(TPU_PCI_DEVICES[device])
  return tuple(chips)


def _run(command: list[str]) -> str:
  """stdout of ``command``, or "" when it is absent, fails or hangs (a wedged driver)."""
  try:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)
  except (OSError, subprocess.TimeoutExpired):
    return ""
  return proc.stdout if proc.returncode == 0 else ""


def probe(pci_devices: str = PCI_DEVICES) -> Machine:
  """Looks at this machine: `nvidia-smi` on PATH, and the PCI devices."""
  gpus = parse_nvidia_smi_list(_run(["nvidia-smi", "-L"]))
  driver = None
  if gpus:
    driver = parse_driver_version(_run(["nvidia-smi", "--query-gpu=driver_version",
                                        "--format=csv,noheader"]))
  return Machine(gpus=gpus, driver=driver, tpu_chips=tpu_chips(pci_devices))


def detected_build(machine: Machine) -> str:
  """The JAX build for ``machine``: cuda13 where the driver runs CUDA 13, else cuda12 for
  an NVIDIA GPU; tpu for TPU chips; cpu otherwise."""
  if machine.gpus:
    return "cuda13" if machine.driver and machine.driver >= CUDA13_MIN_DRIVER else "cuda12"
  return "tpu" if machine.tpu_chips else "cpu"


def choose(requested: str, machine: Machine) -> str:
  """The build to install: ``requested`` ("" to detect) when the machine can run it.

  Raises:
    ValueError: one line (no final period: make adds one) naming what does not match
      and the value that does.
  """
  detected = detected_build(machine)
  fits = f"this machine has {machine.describe()}; leave ACCEL unset to use {detected}"
  if requested == "":
    requested = detected
  elif requested not in ACCELERATORS:
    raise ValueError(f"ACCEL={requested} is not one of {'|'.join(ACCELERATORS)}; {fits}")
  if requested in ("cuda12", "cuda13") and not machine.gpus:
    raise ValueError(f"ACCEL={requested} needs an NVIDIA GPU, but {fits}")
  if requested == "tpu" and not machine.tpu_chips:
    raise ValueError(f"ACCEL=tpu needs a TPU VM, but {fits}")
  if requested in ("cuda12", "cuda13") and machine.driver:
    need = CUDA13_MIN_DRIVER if requested == "cuda13" else CUDA12_MIN_DRIVER
    if machine.driver < need:
      raise ValueError(
          f"ACCEL={requested}: JAX's {requested} wheels need NVIDIA driver >= "
          f"{'.'.join(map(str, need))}, this machine has {'.'.join(map(str, machine.driver))}; "
          + ("use ACCEL=cuda12" if requested == "cuda13" and machine.driver >= CUDA12_MIN_DRIVER
             else "update the driver (or ACCEL=cpu)"))
  return requested


def install_command(accel: str) -> str:
  """How to install the ``accel`` build into cfgdiff's environment."""
  return f"`make ACCEL={accel} setup` (or `pip install -e '.[train,{accel}]'`)"


def cpu_requested(environ: dict[str, str]) -> bool:
  """The user said the CPU is what they want: JAX_PLATFORMS=cpu, JAX's own switch."""
  return environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu"


def installed_plugins() -> dict[str, str]:
  """The accelerator plugins installed here, {extra: "name version"}."""
  found = {}
  for accel, name in PLUGINS.items():
    try:
      found[accel] = f"{name} {importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def refusal(backend: str, machine: Machine, environ: dict[str, str],
            plugins: dict[str, str]) -> str | None:
  """Why JAX must not run on ``backend`` on ``machine``, in one line; None when it may.

  Refuses the CPU on a machine with an NVIDIA GPU or TPU chips, unless JAX_PLATFORMS=cpu.
  """
  accel = detected_build(machine)
  if backend != "cpu" or accel == "cpu" or cpu_requested(environ):
    return None
  wanted = [p for a, p in plugins.items() if a == accel or (a.startswith("cuda")
                                                              and accel.startswith("cuda"))]
  if wanted:  # the right build is there but did not start: reinstalling will not help
    why = (f"{', '.join(wanted)} is installed but JAX fell back to the CPU (see JAX's "
           "warning above: " + ("the driver or CUDA libraries" if machine.gpus else
                                "another process may hold the TPU") + "); fix that")
  else:
    why = f"this environment has JAX's CPU build only; install {install_command(accel)}"
  return (f"this machine has {machine.describe()}, but JAX runs on the CPU: {why}, or set "
          "JAX_PLATFORMS=cpu to run on the CPU on purpose.")


def start_up(jax, allocator: str, environ: dict[str, str] | None = None,
             pci_devices: str = PCI_DEVICES) -> None:
  """Logs one line naming JAX's backend, device kind and device counts, then refuses a CPU
  fallback on a GPU or TPU machine (`refusal`). Call after jax.distributed is initialised.

  Raises:
    configs.ConfigError: the refusal, which cfgdiff.main prints as one line (exit 2).
  """
  from absl import logging  # pylint: disable=g-import-not-at-top

  from cfgdiff import configs  # pylint: disable=g-import-not-at-top
  environ = os.environ if environ is None else environ
  backend = jax.default_backend()
  logging.info("JAX %s on %d %s device(s) (%s), %d process(es); memory allocator: %s.",
               jax.__version__, jax.device_count(), backend,
               jax.local_devices()[0].device_kind, jax.process_count(), allocator)
  if backend != "cpu" or cpu_requested(environ):
    return  # no need to look at the machine (nvidia-smi takes a moment)
  message = refusal(backend, probe(pci_devices), environ, installed_plugins())
  if message:
    raise configs.ConfigError(message)


def _main(argv: list[str]) -> int:
  pci_devices = PCI_DEVICES
  if argv and argv[0].startswith("--pci-devices="):
    pci_devices, argv = argv[0].split("=", 1)[1], argv[1:]
  machine = probe(pci_devices)
  if argv[:1] == ["describe"]:
    print(f"{machine.describe()}: the {detected_build(machine)} build")
    return 0
  if argv[:1] == ["choose"] and len(argv) <= 2:
    try:
      print(choose(argv[1] if len(argv) == 2 else "", machine))
    except ValueError as e:
      print(f"error: {e}")  # the Makefile stops with this line
    return 0
  print(__doc__, file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(_main(sys.argv[1:]))
