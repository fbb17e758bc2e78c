"""When cfgdiff.main re-executes itself under jemalloc, and when it must not."""

import os
import subprocess
import sys

import pytest

from cfgdiff import allocator
from tests.conftest import ROOT

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def test_cpu_host_gets_jemalloc_preloaded_with_page_retention():
  env = allocator.preload_environment({"PATH": "/bin"}, JEMALLOC, accelerator=False)
  assert env == {"PATH": "/bin", "LD_PRELOAD": JEMALLOC, "MALLOC_CONF": allocator.MALLOC_CONF,
                 "CFGDIFF_MALLOC_REEXECUTED": "1"}
  assert "dirty_decay_ms:-1" in allocator.MALLOC_CONF


def test_existing_preloads_are_kept_and_a_users_malloc_conf_wins_where_it_overlaps():
  env = allocator.preload_environment({"LD_PRELOAD": "/lib/libfoo.so", "MALLOC_CONF": "narenas:2"},
                                      JEMALLOC, accelerator=False)
  assert env["LD_PRELOAD"] == f"{JEMALLOC}:/lib/libfoo.so"
  # jemalloc reads options left to right, so the user's come last and win.
  assert env["MALLOC_CONF"] == f"{allocator.MALLOC_CONF},narenas:2"
  # Wrapped twice (make test's pytest, then a CLI run inside it): not repeated.
  env = allocator.preload_environment({"MALLOC_CONF": env["MALLOC_CONF"]}, JEMALLOC, False)
  assert env["MALLOC_CONF"] == f"{allocator.MALLOC_CONF},narenas:2"


def test_no_reexec_when_opted_out_missing_on_an_accelerator_or_already_preloaded():
  assert allocator.preload_environment({"CFGDIFF_MALLOC": "system"}, JEMALLOC, False) is None
  assert allocator.preload_environment({"CFGDIFF_MALLOC": " System "}, JEMALLOC, False) is None
  assert allocator.preload_environment({}, None, False) is None
  assert allocator.preload_environment({}, JEMALLOC, True) is None
  assert allocator.preload_environment(
      {"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, JEMALLOC, False) is None
  # The re-executed process runs on, even if something stripped its LD_PRELOAD: no exec loop.
  env = allocator.preload_environment({}, JEMALLOC, False)
  assert allocator.preload_environment(env, JEMALLOC, False) is None
  assert allocator.preload_environment(dict(env, LD_PRELOAD=""), JEMALLOC, False) is None


def test_a_bad_choice_is_refused_naming_the_variable_and_the_values():
  assert allocator.choice({}) == "jemalloc"
  assert allocator.choice({"CFGDIFF_MALLOC": "jemalloc"}) == "jemalloc"
  with pytest.raises(allocator.AllocatorError, match=r"CFGDIFF_MALLOC='glibc' is invalid: "
                     r"must be one of \('jemalloc', 'system'\)"):
    allocator.preload_environment({"CFGDIFF_MALLOC": "glibc"}, JEMALLOC, False)


def test_accelerators_are_found_by_jax_platforms_or_device_nodes(monkeypatch):
  assert allocator.accelerator_present({"JAX_PLATFORMS": "tpu"})
  assert allocator.accelerator_present({"JAX_PLATFORMS": "cuda,cpu"})
  nodes: list[str] = []
  monkeypatch.setattr(allocator.glob, "glob", lambda pattern: [p for p in nodes
                                                               if p.startswith(pattern[:9])])
  assert not allocator.accelerator_present({})
  nodes.append("/dev/nvidia0")
  assert allocator.accelerator_present({})
  nodes[:] = ["/dev/accel0"]
  assert allocator.accelerator_present({})
  assert not allocator.accelerator_present({"JAX_PLATFORMS": " cpu"})  # forced onto the CPU


def test_the_command_wrapper_runs_a_command_under_the_same_rule(tmp_path):
  """`python -m cfgdiff.allocator CMD` (how make test starts pytest) preloads jemalloc
  exactly where cfgdiff.main would, and passes the arguments and exit status through."""
  script = "import os, sys; print(os.environ.get('LD_PRELOAD', '')); sys.exit(3)"
  env = {k: v for k, v in os.environ.items()
         if k not in ("LD_PRELOAD", allocator.REEXECUTED, allocator.CHOICE)}
  for extra, preloaded in (({}, allocator.find_jemalloc() is not None
                            and not allocator.accelerator_present(env)),
                           ({allocator.CHOICE: "system"}, False)):
    proc = subprocess.run([sys.executable, "-m", "cfgdiff.allocator", sys.executable, "-c",
                           script], env=dict(env, **extra), capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 3, proc.stderr
    assert ("jemalloc" in proc.stdout) == preloaded


def test_a_jemalloc_preloaded_without_page_retention_is_named_with_the_fix(monkeypatch):
  assert allocator.retains_freed_pages(allocator.MALLOC_CONF)
  assert allocator.retains_freed_pages(f"{allocator.MALLOC_CONF},narenas:2")
  assert not allocator.retains_freed_pages("")
  assert not allocator.retains_freed_pages(f"{allocator.MALLOC_CONF},dirty_decay_ms:1000")
  maps = f"7f00-7f01 r-xp 0 08:01 1 {JEMALLOC}\n"
  monkeypatch.setenv("MALLOC_CONF", allocator.MALLOC_CONF)
  assert allocator.in_use(maps) == f"jemalloc (MALLOC_CONF={allocator.MALLOC_CONF})"
  monkeypatch.setenv("MALLOC_CONF", "narenas:2")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  message = allocator.in_use(maps)
  assert "returning freed pages" in message and f"add {allocator.MALLOC_CONF}" in message
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")  # measured on CPU hosts only: no advice
  assert allocator.in_use(maps) == "jemalloc (MALLOC_CONF=narenas:2)"


def test_make_jemalloc_tries_apt_once_and_then_says_how_to_retry(tmp_path):
  """`make setup` runs the jemalloc target every time: after a failed install (offline,
  no sudo) it must not run apt-get again on each `make run`; a successful one leaves no
  marker."""
  bin_dir, calls, outcome = tmp_path / "bin", tmp_path / "apt_calls", tmp_path / "apt_exit"
  bin_dir.mkdir()
  (bin_dir / "ldconfig").write_text("#!/bin/sh\nexit 0\n")  # lists no libjemalloc
  (bin_dir / "apt-get").write_text(
      f"#!/bin/sh\necho \"$@\" >> {calls}\nexit $(cat {outcome})\n")
  for tool in ("ldconfig", "apt-get"):
    (bin_dir / tool).chmod(0o755)
  venv, marker = tmp_path / "venv", tmp_path / "venv" / ".jemalloc-install-failed"
  env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
  env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"

  def make_jemalloc(apt_exit: int) -> str:
    outcome.write_text(str(apt_exit))
    # SUDO= on the command line overrides the Makefile's: no sudo, root or not.
    proc = subprocess.run(["make", "-s", "-C", ROOT, "jemalloc", f"VENV={venv}", "SUDO="],
                          env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr  # never fails the set-up
    return proc.stdout

  assert "jemalloc not installed" in make_jemalloc(apt_exit=100)
  assert calls.read_text().splitlines() == ["update -qq"] and marker.exists()
  second = make_jemalloc(apt_exit=0)
  assert "not tried again" in second and f"rm {marker} to retry" in second
  assert calls.read_text().splitlines() == ["update -qq"]
  marker.unlink()
  assert "not installed" not in make_jemalloc(apt_exit=0)
  assert calls.read_text().splitlines() == ["update -qq", "update -qq",
                                            "install -y -qq libjemalloc2"]
  assert not marker.exists()
