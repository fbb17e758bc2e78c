"""Shared helpers for benchmarks: run a variant in a fresh process, append BENCHMARKS.md rows."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(ROOT, "BENCHMARKS.md")


def run_variant(module: str, variant: dict, devices: int, extra_xla_flags: str = "") -> dict:
  """Runs ``python -m module --worker JSON`` with ``devices`` CPU devices; returns its JSON."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {extra_xla_flags}"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  out = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(variant)],
                       cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    raise RuntimeError(f"variant {variant} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def append_section(title: str, command: str, header: list[str], rows: list[list]) -> None:
  """Appends a dated markdown table with the command that produced it."""
  lines = [f"\n## {title}\n", f"{datetime.date.today().isoformat()}, `{command}`, "
           f"{os.cpu_count()} cores.\n", "| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  with open(BENCHMARKS_MD, "a") as f:
    f.write("\n".join(lines) + "\n")
