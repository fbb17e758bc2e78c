"""Builds BENCHMARKS.md from the results log: the current table of each benchmark.

Benchmarks record every table they measure in benchmarks/results.jsonl (common.record). The
page shows, for each section below, the newest table of each (title, command, CPU, chip): a
rerun on the same machine replaces the row set, a run on another CPU or chip sits beside it.
Older tables stay in the log, and in git.

  python -m benchmarks.page           # rewrite BENCHMARKS.md
  python -m benchmarks.page --check   # exit 1 if BENCHMARKS.md is not the log's page
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from benchmarks import common

BENCHMARKS_MD = os.path.join(common.ROOT, "BENCHMARKS.md")

INTRODUCTION = """\
# Benchmarks

The current numbers of each benchmark in `benchmarks/`, with the command that measured them,
the date and the CPU (model and vector extensions) or chip. This page is built from the
results log `benchmarks/results.jsonl` by `python -m benchmarks.page`; a benchmark run records
its table there. The CPU machines have 2 cores and change between sessions (AMD EPYC Zen 3
with AVX2, Intel Xeon with AVX-512 and AMX); timing on them is noisy, so compare the rows of
one table, which were measured in one run, as ratios. What the numbers mean for cfgdiff's
design is in `docs/performance.md`.
"""


@dataclasses.dataclass(frozen=True)
class Section:
  """A section of the page: the tables whose title starts with ``prefix``."""
  prefix: str
  reading: str  # What the table measures and how to read it.
  rerun: str  # The command that measures it.
  # False where the numbers do not depend on the machine (FLOP counts, plans): the newest
  # table of a title then replaces the others, whatever command or CPU made them.
  per_machine: bool = True


SECTIONS = (
    Section("Model size", "Parameters and forward FLOPs (XLA's cost analysis of one forward "
            "pass, a multiply-add counted as 2 FLOPs).",
            "python -m benchmarks.model_size --experiments fashion_mnist,imagenet64,imagenet128",
            per_machine=False),
    Section("Compute plan", "Chip-hours of the paper's runs at 40% model FLOP utilisation of "
            "each chip's dense bf16 peak: a plan, not a measurement.",
            "python -m benchmarks.compute_plan", per_machine=False),
    Section("Accelerator check", "The ImageNet-64 training step in bf16, the guided sampler "
            "and the FID Inception features on one accelerator: images/s per chip, TFLOP/s "
            "against the chip's peak, peak memory against `cfgdiff.memory_plan`, and the "
            "projected hours of the paper's run.",
            "python -m benchmarks.accelerator_check"),
    Section("Training throughput", "Training steps on CPU by model, device split, "
            "micro-batch and dropout; measured before jemalloc, the flat gradient all-reduce "
            "and the kernel-gradient choice (the JAX-against-PyTorch tables are newer).",
            "python -m benchmarks.train_throughput --models reference,fashion_mnist,imagenet64"),
    Section("ImageNet-64 model", "The paper's 64x64 model on CPU: replicated against FSDP "
            "over 2 devices, float32 against bf16. FSDP halves the state per device; bf16 "
            "gains little on XLA:CPU.",
            "python -m benchmarks.train_throughput --models imagenet64 --steps 2"),
    Section("Sampling throughput", "Samplers and guidance variants on the Fashion-MNIST model: "
            "a guided step costs two network evaluations.",
            "python -m benchmarks.sample_throughput --devices 2 --batch 80"),
    Section("Evaluation cost", "The FID Inception network and the Fashion-MNIST classifier, "
            "and the metrics on 10,000 features.",
            "python -m benchmarks.eval_throughput --images 200"),
    Section("Input pipeline", "Images/s the grain pipeline delivers per host from ArrayRecord "
            "against what a TPU v4-32 host's four chips need at 40% utilisation; measured "
            "while other jobs shared the cores, so lower bounds.",
            "python -m benchmarks.input_throughput --workers 0,1,2"),
    Section("JAX against PyTorch eager", "The same network and weights in both frameworks "
            "(PyTorch port: `benchmarks/torch_unet.py`), JAX with one XLA device per core, "
            "PyTorch with one thread per core. \"reference\" is a 7.7M-parameter comparison "
            "U-Net at batch 64.",
            "python -m benchmarks.vs_torch --models reference,fashion_mnist --steps 4"),
    Section("Convolutions and matrix products against everything else", "Each step split, "
            "on one core, into convolutions and matrix products against all other work: "
            "the bound on JAX's speed if all other work were free.",
            "python -m benchmarks.kernel_share --models reference,fashion_mnist --steps 4"),
    Section("Device split", "One process with one XLA device per core against one pinned "
            "process per core: what splitting the CPU into devices costs.",
            "python -m benchmarks.device_split"),
    Section("Memory allocator", "The training step under glibc's malloc and under jemalloc "
            "(what `cfgdiff.main` preloads on a CPU host): XLA:CPU page-faults its buffers in "
            "at every step under glibc.",
            "python -m benchmarks.malloc --models fashion_mnist,reference --rounds 2 --steps 6"),
)


def load(path: str) -> list[dict]:
  """The records of a results log, oldest first."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def section_of(entry: dict) -> Section | None:
  """The page section a record belongs to; None for tables kept only in the log."""
  return next((s for s in SECTIONS if entry["title"].startswith(s.prefix)), None)


def current(records: list[dict]) -> dict[str, list[dict]]:
  """Section prefix -> its current records, newest first: the last record of each (title,
  command, CPU, chip), since a rerun on the same machine supersedes the earlier table; of
  each (title, chip) where the section's numbers do not depend on the machine."""
  latest: dict[tuple, dict] = {}
  for entry in records:
    section = section_of(entry)
    key = (entry["title"], entry.get("chip"))
    if section is None or section.per_machine:
      key += (entry["command"], entry.get("cpu"))
    latest.pop(key, None)  # Re-insert, so that dict order is the order of the newest runs.
    latest[key] = entry
  by_section: dict[str, list[dict]] = {s.prefix: [] for s in SECTIONS}
  for entry in reversed(list(latest.values())):
    section = section_of(entry)
    if section is not None:
      by_section[section.prefix].append(entry)
  return by_section


def machine(entry: dict) -> str:
  """Where a record ran, as the page names it."""
  if entry.get("cpu") is None:
    where = "CPU model not recorded"
  else:
    where = f"{entry['cpu']} ({entry['vector']})"
  where = f"{entry['cores']} cores, {where}"
  return f"{entry['chip']}, host {where}" if entry.get("chip") else where


def render(records: list[dict]) -> str:
  """BENCHMARKS.md for ``records``."""
  lines = [INTRODUCTION]
  for section in SECTIONS:
    lines += [f"## {section.prefix}", "", section.reading, ""]
    entries = current(records)[section.prefix]
    if not entries:
      lines += [f"Not measured yet: `{section.rerun}`.", ""]
    shown_title = section.prefix
    for entry in entries:
      if entry["title"] != shown_title:
        lines += [f"### {entry['title']}", ""]
        shown_title = entry["title"]
      lines += [f"{entry['date']}, `{entry['command']}`, {machine(entry)}.", ""]
      lines += common.markdown_table(entry["header"], entry["rows"]) + [""]
      lines += entry["notes"] + ([""] if entry["notes"] else [])
  return "\n".join(lines).rstrip("\n") + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--log", default=common.results_log())
  parser.add_argument("--check", action="store_true",
                      help="exit 1 if BENCHMARKS.md is not the page of the log")
  args = parser.parse_args()
  page = render(load(args.log))
  if args.check:
    with open(BENCHMARKS_MD) as f:
      if f.read() != page:
        sys.exit("BENCHMARKS.md is not built from benchmarks/results.jsonl: "
                 "run `python -m benchmarks.page`")
    return
  with open(BENCHMARKS_MD, "w") as f:
    f.write(page)
  print(f"wrote {BENCHMARKS_MD} from {args.log} ({len(page):,} bytes)")


if __name__ == "__main__":
  main()
