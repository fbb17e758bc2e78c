"""The accelerator check (cfgdiff/backend.py): a GPU or TPU machine that would run JAX on
the CPU is refused at start-up unless JAX_PLATFORMS=cpu, and `make` installs the JAX build
the machine has, or stops in one line when told one it cannot run. Machines are stand-ins:
an `nvidia-smi` script on PATH and a fake PCI device tree."""

import os
import shutil
import subprocess

import pytest

from cfgdiff import backend
from tests.conftest import ROOT, TINY_CONFIG, run_cli

H200_LIST = ("GPU 0: NVIDIA H200 (UUID: GPU-0c5ae4d6-7f4f-3c1c-8e3c-2b1c2f7c9a11)\n"
             "GPU 1: NVIDIA H200 (UUID: GPU-1d6bf5e7-8a5a-4d2d-9f4d-3c2d3a8dab22)\n")


def _stand_in_nvidia_smi(tmp_path, listing: str = H200_LIST, driver: str = "580.65.06",
                         fails: bool = False) -> str:
  """A bin folder whose `nvidia-smi` answers -L and the driver query like the real one (or
  fails as it does with no driver loaded)."""
  folder = tmp_path / "bin"
  folder.mkdir(exist_ok=True)
  script = folder / "nvidia-smi"
  if fails:
    script.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it couldn't "
                      "communicate with the NVIDIA driver.'\nexit 9\n")
  else:
    lines = "".join(f"echo '{driver}'\n" for _ in listing.splitlines())
    script.write_text("#!/bin/sh\n"
                      f"if [ \"$1\" = -L ]; then printf '%s' '{listing}'; exit 0; fi\n"
                      f"case \"$1\" in --query-gpu=driver_version) {lines} exit 0;; esac\n"
                      "exit 2\n")
  script.chmod(0o755)
  return str(folder)


def _pci_tree(tmp_path, devices: dict[str, tuple[str, str]]) -> str:
  """A /sys/bus/pci/devices stand-in: {address: (vendor, device)}."""
  root = tmp_path / "pci"
  root.mkdir()
  for address, (vendor, device) in devices.items():
    (root / address).mkdir()
    (root / address / "vendor").write_text(vendor + "\n")
    (root / address / "device").write_text(device + "\n")
  return str(root)


# The pure functions.

def test_nvidia_smi_output_and_driver_are_parsed():
  assert backend.parse_nvidia_smi_list(H200_LIST) == ("NVIDIA H200", "NVIDIA H200")
  assert backend.parse_nvidia_smi_list("GPU 0: Tesla T4\n") == ("Tesla T4",)
  assert backend.parse_nvidia_smi_list("No devices were found\n") == ()
  assert backend.parse_driver_version("580.65.06\n580.65.06\n") == (580, 65, 6)
  assert backend.parse_driver_version("") is None


def test_tpu_chips_are_found_by_google_vendor_and_tpu_device_id(tmp_path):
  root = _pci_tree(tmp_path, {
      "0000:00:04.0": ("0x1ae0", "0x005e"), "0000:00:05.0": ("0x1ae0", "0x005e"),
      "0000:00:06.0": ("0x1ae0", "0x0042"),  # a Google device that is no TPU (gVNIC-like)
      "0000:00:07.0": ("0x10de", "0x2335")})  # an NVIDIA device
  assert backend.tpu_chips(root) == ("v4", "v4")
  assert backend.tpu_chips(str(tmp_path / "absent")) == ()


@pytest.mark.parametrize("machine, expected", [
    (backend.Machine(gpus=("NVIDIA H200",), driver=(580, 65, 6)), "cuda13"),
    (backend.Machine(gpus=("NVIDIA A100",), driver=(535, 104, 5)), "cuda12"),
    (backend.Machine(gpus=("NVIDIA A100",), driver=None), "cuda12"),
    (backend.Machine(tpu_chips=("v5e",) * 4), "tpu"),
    (backend.Machine(), "cpu"),
])
def test_the_detected_build_follows_the_machine(machine, expected):
  assert backend.detected_build(machine) == expected
  assert backend.choose("", machine) == expected


@pytest.mark.parametrize("requested, machine, message", [
    ("cuda12", backend.Machine(), "ACCEL=cuda12 needs an NVIDIA GPU, but this machine has no "
     "NVIDIA GPU"),
    ("tpu", backend.Machine(gpus=("NVIDIA H200",), driver=(580,)), "ACCEL=tpu needs a TPU VM"),
    ("gpu", backend.Machine(), "ACCEL=gpu is not one of cpu|cuda12|cuda13|tpu"),
    ("cuda13", backend.Machine(gpus=("NVIDIA A100",), driver=(535, 104, 5)),
     "need NVIDIA driver >= 580, this machine has 535.104.5; use ACCEL=cuda12"),
    ("", backend.Machine(gpus=("Tesla K80",), driver=(470, 82)), "update the driver"),
])
def test_a_build_the_machine_cannot_run_is_refused(requested, machine, message):
  with pytest.raises(ValueError, match=message.replace("|", r"\|")):
    backend.choose(requested, machine)


def test_cpu_everywhere_and_a_matching_build_are_accepted():
  h200 = backend.Machine(gpus=("NVIDIA H200",), driver=(580, 65, 6))
  assert backend.choose("cpu", h200) == "cpu"
  assert backend.choose("cuda12", h200) == "cuda12"  # a newer driver runs CUDA 12 too


def test_refusal_names_the_fix_and_respects_jax_platforms_cpu():
  h200 = backend.Machine(gpus=("NVIDIA H200",), driver=(580, 65, 6))
  message = backend.refusal("cpu", h200, {}, {})
  assert "NVIDIA H200" in message and "JAX runs on the CPU" in message
  assert "make ACCEL=cuda13 setup" in message and "pip install -e '.[train,cuda13]'" in message
  assert "JAX_PLATFORMS=cpu" in message and "\n" not in message
  assert backend.refusal("cpu", h200, {"JAX_PLATFORMS": "cpu"}, {}) is None
  assert backend.refusal("gpu", h200, {}, {}) is None
  assert backend.refusal("cpu", backend.Machine(), {}, {}) is None
  # The right plugin is installed but did not start: reinstalling would not help.
  message = backend.refusal("cpu", h200, {}, {"cuda12": "jax-cuda12-plugin 0.10.2"})
  assert "jax-cuda12-plugin 0.10.2 is installed but JAX fell back" in message
  assert "pip install" not in message
  tpu = backend.Machine(tpu_chips=("v5e",) * 4)
  assert "make ACCEL=tpu setup" in backend.refusal("cpu", tpu, {}, {})
  assert "libtpu" in backend.refusal("cpu", tpu, {}, {"tpu": "libtpu 0.0.42"})


# The real command line.

def _cli(tmp_path, workdir, **env):
  # A data path that does not exist: a run the refusal failed to stop ends at once, on a
  # DataError, instead of training.
  return run_cli(f"--config={TINY_CONFIG}", f"--workdir={workdir}",
                 f"--config.data.path={tmp_path / 'no_data'}", timeout=300,
                 env=dict({"PATH": f"{_stand_in_nvidia_smi(tmp_path)}:{os.environ['PATH']}",
                           "JAX_PLATFORMS": ""}, **env))


def test_cli_refuses_cpu_jax_on_a_gpu_machine_in_one_line_writing_nothing(tmp_path):
  workdir = tmp_path / "workdir"
  proc = _cli(tmp_path, workdir)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("cfgdiff: error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert "2 NVIDIA GPU(s) (NVIDIA H200; driver 580.65.6)" in errors[0]
  assert "make ACCEL=cuda13 setup" in errors[0] and "JAX_PLATFORMS=cpu" in errors[0]
  assert "on 1 cpu device(s) (cpu)" in proc.stderr, "the start-up line names the backend"
  assert not workdir.exists()


def test_cli_runs_on_the_cpu_when_asked_with_jax_platforms_cpu(tmp_path):
  proc = _cli(tmp_path, tmp_path / "workdir", JAX_PLATFORMS="cpu")
  assert "JAX runs on the CPU" not in proc.stderr
  assert "on 1 cpu device(s) (cpu)" in proc.stderr
  assert "Fashion-MNIST file" in proc.stderr, "went on to read the data"


# The Makefile.

def _make(tmp_path, *args, nvidia_smi: str | None = None, pci: dict | None = None):
  """`make ARGS` with a stand-in machine: an `nvidia-smi` (None: one that fails, as with
  no driver) and PCI devices; VENV in tmp_path so nothing of the checkout is touched."""
  if nvidia_smi is None:
    folder = _stand_in_nvidia_smi(tmp_path, fails=True)
  else:
    listing, driver = nvidia_smi.split("|")
    folder = _stand_in_nvidia_smi(tmp_path, listing, driver)
  env = dict(os.environ, PATH=f"{folder}:{os.environ['PATH']}")
  env.pop("ACCEL", None)
  return subprocess.run(
      ["make", "--no-print-directory", "-C", ROOT, f"VENV={tmp_path / 'venv'}",
       f"PCI_DEVICES={_pci_tree(tmp_path, pci or {})}", *args],
      env=env, capture_output=True, text=True, timeout=60, check=False)


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


@needs_make
@pytest.mark.parametrize("machine, accel, install", [
    (dict(nvidia_smi=H200_LIST + "|580.65.06"), "", '-e ".[train,cuda13]"'),
    (dict(nvidia_smi="GPU 0: NVIDIA A100-SXM4-80GB\n|535.104.05"), "", '".[train,cuda12]"'),
    (dict(nvidia_smi=H200_LIST + "|580.65.06"), "ACCEL=cuda12", '".[train,cuda12]"'),
    (dict(pci={"0000:00:04.0": ("0x1ae0", "0x0063")}), "", '".[train,tpu]"'),
    (dict(), "", '-e ".[train]"'),
    (dict(nvidia_smi=H200_LIST + "|580.65.06"), "ACCEL=cpu", '-e ".[train]"'),
])
def test_make_installs_the_build_the_machine_has(tmp_path, machine, accel, install):
  proc = _make(tmp_path, "-n", "setup", *([accel] if accel else []), **machine)
  assert proc.returncode == 0, proc.stderr
  pip = [line for line in proc.stdout.splitlines() if "pip install --quiet -e" in line]
  assert len(pip) == 1 and pip[0].endswith(install), proc.stdout


@needs_make
def test_make_accel_says_what_it_chose(tmp_path):
  proc = _make(tmp_path, "accel", nvidia_smi=H200_LIST + "|580.65.06")
  assert proc.stdout.strip() == ("ACCEL=cuda13: 2 NVIDIA GPU(s) (NVIDIA H200; driver "
                                 "580.65.6) listed by nvidia-smi: the cuda13 build"), proc.stdout


@needs_make
@pytest.mark.parametrize("machine, accel, message", [
    (dict(), "ACCEL=cuda12", "ACCEL=cuda12 needs an NVIDIA GPU, but this machine has no "
     "NVIDIA GPU (nvidia-smi) and no TPU (PCI); leave ACCEL unset to use cpu"),
    (dict(), "ACCEL=tpu", "ACCEL=tpu needs a TPU VM"),
    (dict(), "ACCEL=rocm", "ACCEL=rocm is not one of cpu|cuda12|cuda13|tpu"),
    (dict(nvidia_smi="GPU 0: NVIDIA A100-SXM4-80GB\n|535.104.05"), "ACCEL=cuda13",
     "use ACCEL=cuda12"),
])
def test_make_stops_in_one_line_on_a_build_the_machine_cannot_run(tmp_path, machine, accel,
                                                                  message):
  proc = _make(tmp_path, "setup", accel, **machine)  # not -n: it must write nothing
  assert proc.returncode != 0
  assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
  assert proc.stdout == "" and not (tmp_path / "venv").exists()
