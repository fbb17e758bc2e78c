"""What setup.py installs: a lean library (sampling, evaluation and the notebook without
TensorFlow, clu or tensorboard), training's writers as cfgdiff[train], JAX's own
accelerator extras, and a main job (cfgdiff[train]) that pip's resolver can install on
linux-aarch64 (GH200 nodes) and macOS-arm64 as well as here.

The resolver checks ask PyPI (skipped, saying so, only when it cannot be reached); they
never fetch a CUDA or TPU wheel."""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
import textwrap
import urllib.request
from unittest import mock

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT, xla_flags

TRAINING_ONLY = ("tensorflow", "tensorflow-cpu", "clu", "tensorboard")
LINUX_AARCH64 = ["manylinux2014_aarch64"] + [f"manylinux_2_{v}_aarch64" for v in range(17, 29)]
LINUX_X86_64 = ["manylinux2014_x86_64"] + [f"manylinux_2_{v}_x86_64" for v in range(17, 36)]
MACOS_ARM64 = ["macosx_14_0_arm64"]
PYTHON = "3.11"  # setup.py's floor


def _setup_kwargs() -> dict:
  """What setup.py passes to setuptools.setup, read without building anything."""
  with mock.patch("setuptools.setup") as setup:
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
      runpy.run_path(os.path.join(ROOT, "setup.py"))
    finally:
      os.chdir(cwd)
  return setup.call_args.kwargs


SETUP = _setup_kwargs()


def _names(requirements: list[str]) -> set[str]:
  return {Requirement(r).name.lower() for r in requirements}


def test_only_the_cfgdiff_package_is_installed():
  assert SETUP["packages"] and {p.split(".")[0] for p in SETUP["packages"]} == {"cfgdiff"}


def test_the_library_needs_no_tensorflow_and_training_gets_it_as_an_extra():
  assert not _names(SETUP["install_requires"]) & set(TRAINING_ONLY)
  assert {"clu", "tensorboard", "tensorflow-cpu", "tensorflow"} == _names(
      SETUP["extras_require"]["train"])


def test_accelerator_extras_are_jaxs_own_at_cfgdiffs_jax_floor():
  jax = next(Requirement(r) for r in SETUP["install_requires"] if r.startswith("jax"))
  for extra in ("cuda12", "cuda13", "tpu"):
    (requirement,) = [Requirement(r) for r in SETUP["extras_require"][extra]]
    assert (requirement.name, requirement.extras, requirement.specifier) == (
        "jax", {extra}, jax.specifier)


def test_tensorflow_wheel_per_platform():
  """x86-64 Linux gets the CPU-only tensorflow-cpu (no wheels elsewhere); linux-aarch64 and
  macOS-arm64 get tensorflow, itself CPU-only there."""
  def wanted(machine, system):
    env = {"platform_machine": machine, "sys_platform": system}
    return {Requirement(r).name for r in SETUP["extras_require"]["train"]
            if Requirement(r).marker is None or Requirement(r).marker.evaluate(env)}
  assert wanted("x86_64", "linux") == {"clu", "tensorboard", "tensorflow-cpu"}
  assert wanted("aarch64", "linux") == {"clu", "tensorboard", "tensorflow"}
  assert wanted("arm64", "darwin") == {"clu", "tensorboard", "tensorflow"}


# The lean library in use.

BLOCKER = textwrap.dedent("""\
    # As if tensorflow, clu and tensorboard were not installed: the finder of installed
    # packages does not find them (find_spec gives None, import raises ModuleNotFoundError).
    import sys
    from importlib.machinery import PathFinder
    BLOCKED = {"tensorflow", "clu", "tensorboard"}
    class NotInstalled(PathFinder):
      @classmethod
      def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
          return None
        return PathFinder.find_spec(name, path, target)
    sys.meta_path[sys.meta_path.index(PathFinder)] = NotInstalled
    """)



def test_sampling_and_evaluation_import_and_sample_without_tensorflow(tmp_path):
  """As if installed without cfgdiff[train]: every import of tensorflow, clu or tensorboard
  fails. The notebook's imports, the evaluation package and the sweep import; the shipped
  reference model samples; a training run is refused in one line naming the extra."""
  (tmp_path / "sitecustomize.py").write_text(BLOCKER)
  code = textwrap.dedent("""\
      import sys
      import numpy as np
      from cfgdiff import checkpoint, configs, data, sampling  # the notebook's imports
      from cfgdiff import sweep, train
      from cfgdiff.evaluation import batching, classifier, evaluator, inception, metrics
      sampler = sampling.CheckpointSampler.from_reference("fashion_mnist")
      images = sampler.sample(np.array([0, 7]), 1.0, num_steps=2)
      assert images.shape == (2, 28, 28, 1) and images.dtype == np.uint8, images.shape
      loaded = sorted(m for m in sys.modules if m.split(".")[0] in
                      ("tensorflow", "clu", "tensorboard"))
      assert not loaded, loaded
      print("sampled", images.shape)
      """)
  env = dict(os.environ, PYTHONPATH=f"{tmp_path}:{ROOT}", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=1"))
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0 and "sampled (2, 28, 28, 1)" in proc.stdout, proc.stderr[-3000:]
  # The blocker works: the same interpreter cannot import them.
  for module in ("clu.metric_writers", "tensorflow", "tensorboard"):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert f"No module named '{module.split('.')[0]}'" in proc.stderr, proc.stderr


def test_training_without_the_train_extra_is_refused_in_one_line(tmp_path, synthetic_data):
  from tests.conftest import TINY_CONFIG, run_cli
  (tmp_path / "site").mkdir()
  (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
  proc = run_cli(f"--config={TINY_CONFIG}", f"--workdir={tmp_path / 'workdir'}",
                 f"--config.data.path={synthetic_data}", timeout=300,
                 env={"PYTHONPATH": f"{tmp_path / 'site'}:{ROOT}"})
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("cfgdiff: error: training writes its metrics with clu")
  assert "pip install -e '.[train]'" in last


# pip's resolver, for other platforms.

def _pypi_reachable() -> bool:
  try:
    with urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=10):
      return True
  except OSError:
    return False


needs_pypi = pytest.mark.skipif(not _pypi_reachable(),
                                reason="PyPI (https://pypi.org) cannot be reached from here")


def _pip(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                        capture_output=True, text=True, timeout=timeout, check=False)


def _platform_args(platforms: list[str]) -> list[str]:
  return [a for p in platforms for a in ("--platform", p)] + [
      "--python-version", PYTHON, "--only-binary=:all:"]


def _main_job_requirements(machine: str, system: str) -> list[str]:
  """cfgdiff's and cfgdiff[train]'s requirements for that platform. pip evaluates markers
  for the machine it runs on even with --platform, so setup.py's are evaluated here."""
  env = {"platform_machine": machine, "sys_platform": system, "python_version": PYTHON}
  out = []
  for text in SETUP["install_requires"] + SETUP["extras_require"]["train"]:
    requirement = Requirement(text)
    if requirement.marker is None or requirement.marker.evaluate(env):
      requirement.marker = None
      out.append(str(requirement))
  return out


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> str:
  """Pure-Python wheels built from source archives, shared by the platforms' checks."""
  return str(tmp_path_factory.mktemp("wheels"))


def resolve(requirements: list[str], platforms: list[str], wheels: str, work: str) -> dict:
  """pip's resolution (its --report) of ``requirements`` for ``platforms``, installing
  nothing. A dependency published only as a source archive (tensorflow-datasets needs
  `promise`) is built here into ``wheels``, and accepted only as a pure-Python wheel,
  which installs on any platform."""
  for _ in range(4):
    report = os.path.join(work, "report.json")
    proc = _pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", report,
                "--target", os.path.join(work, "target"), "--find-links", wheels,
                *_platform_args(platforms), *requirements, timeout=240)
    if proc.returncode == 0:
      with open(report) as f:
        return json.load(f)
    missing = re.search(r"No matching distribution found for (\S+)", proc.stderr)
    assert missing, proc.stderr[-3000:]
    built = _pip("wheel", "--no-deps", "--no-binary", ":all:", "--quiet", "-w", wheels,
                 missing.group(1))
    pure = [f for f in os.listdir(wheels) if f.endswith("-none-any.whl")]
    assert built.returncode == 0 and pure, (
        f"{missing.group(1)} has no wheel for {platforms} and is not pure Python: "
        + proc.stderr[-2000:])
  raise AssertionError(f"unresolved after building {pure}: {proc.stderr[-3000:]}")


@needs_pypi
@pytest.mark.parametrize("name, platforms, machine, system", [
    ("linux-aarch64", LINUX_AARCH64, "aarch64", "linux"),
    ("macos-arm64", MACOS_ARM64, "arm64", "darwin"),
])
def test_main_job_install_resolves_on_arm(tmp_path, wheels, name, platforms, machine, system):
  report = resolve(_main_job_requirements(machine, system), platforms, wheels, str(tmp_path))
  chosen = {item["metadata"]["name"].lower(): item["metadata"]["version"]
            for item in report["install"]}
  assert {"jax", "jaxlib", "clu", "tensorflow", "tensorboard", "grain",
          "orbax-checkpoint"} <= set(chosen), sorted(chosen)
  assert "tensorflow-cpu" not in chosen
  assert not [n for n in chosen if n.startswith(("nvidia-", "jax-cuda", "libtpu"))]
  print(name, {n: chosen[n] for n in ("jax", "jaxlib", "tensorflow", "grain")})


@needs_pypi
def test_accelerator_extras_resolve_to_published_wheels(tmp_path, wheels):
  """What `jax[cuda12]`, `jax[cuda13]` and `jax[tpu]` pull in, at the JAX the main job
  resolves to, has wheels for their platforms. Reads jax's own metadata (its wheel is pure
  Python) and PyPI's index of each plugin; no plugin or CUDA wheel is downloaded."""
  jax_floor = [r for r in SETUP["install_requires"] if Requirement(r).name == "jax"]
  report = resolve(["--no-deps", *jax_floor], LINUX_X86_64, wheels, str(tmp_path))
  (jax,) = [item["metadata"] for item in report["install"]]
  assert jax["name"] == "jax"
  requires = [Requirement(r) for r in jax["requires_dist"]]
  checked = []
  for extra, platforms in (("cuda12", LINUX_X86_64), ("cuda12", LINUX_AARCH64),
                           ("cuda13", LINUX_X86_64), ("cuda13", LINUX_AARCH64),
                           ("tpu", LINUX_X86_64)):
    wanted = [r for r in requires if r.marker is not None and r.marker.evaluate(
        {"extra": extra}) and not r.marker.evaluate({"extra": "_none_"})]
    names = {r.name for r in wanted}
    assert "jaxlib" in names and len(names) >= 2, (extra, names)
    for requirement in wanted:
      if requirement.name == "jaxlib":
        continue  # the main job's resolution above already holds a jaxlib
      versions = _available(requirement.name, platforms)
      assert any(v in requirement.specifier for v in versions), (
          f"{extra}: no {requirement} wheel for {platforms[0]}; PyPI has {versions[:5]}")
      checked.append(f"{requirement.name}{requirement.specifier} {platforms[0]}")
    if extra.startswith("cuda"):  # the plugin's PJRT half, published beside it
      pjrt = f"jax-{extra}-pjrt"
      assert jax["version"] in _available(pjrt, platforms), pjrt
  print(jax["version"], checked)


def _available(name: str, platforms: list[str]) -> list[str]:
  proc = _pip("index", "versions", name, *_platform_args(platforms), timeout=60)
  match = re.search(r"Available versions: (.+)", proc.stdout)
  return [v.strip() for v in match.group(1).split(",")] if match else []

