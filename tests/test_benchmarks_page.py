"""BENCHMARKS.md is the page of the results log, and the page shows each benchmark's newest table
per machine."""

import json
import os

from benchmarks import common, page


def test_committed_page_is_built_from_the_committed_log():
  with open(page.BENCHMARKS_MD) as f:
    committed = f.read()
  assert committed == page.render(page.load(common.RESULTS_LOG)), (
      "run `python -m benchmarks.page` after recording benchmark results")


def test_every_committed_record_names_its_command_and_date():
  for entry in page.load(common.RESULTS_LOG):
    assert entry["command"].startswith("python -m benchmarks."), entry["title"]
    assert len(entry["date"]) == 10 and entry["date"].startswith("2026-"), entry["title"]
    assert all(len(row) == len(entry["header"]) for row in entry["rows"]), entry["title"]


def _rerecord_on(log, cpu: str, rows: list[list], title="Device split: x") -> None:
  """Records a table, then rewrites its CPU as another machine's run would have."""
  common.record(title, "python -m benchmarks.device_split", ["variant", "ms"], rows)
  with open(log) as f:
    entries = [json.loads(line) for line in f]
  entries[-1]["cpu"] = cpu
  with open(log, "w") as f:
    f.writelines(json.dumps(e) + "\n" for e in entries)


def test_rerun_replaces_the_same_machines_table_and_keeps_another_machines(tmp_path, monkeypatch):
  log = tmp_path / "results.jsonl"
  monkeypatch.setenv("CFGDIFF_BENCHMARK_LOG", str(log))
  _rerecord_on(log, "CPU A", [["one process", "111"]])
  _rerecord_on(log, "CPU B", [["one process", "222"]])
  _rerecord_on(log, "CPU A", [["one process", "333"]])
  _rerecord_on(log, "CPU A", [["x", "1"]], title="A table no section shows")
  entries = page.load(str(log))
  assert len(entries) == 4 and entries[0]["rows"] == [["one process", "111"]]

  shown = page.current(entries)["Device split"]
  assert [e["rows"][0][1] for e in shown] == ["333", "222"]  # newest first, one per CPU
  text = page.render(entries)
  assert "| one process | 333 |" in text and "| one process | 222 |" in text
  assert "111" not in text and "A table no section shows" not in text
  assert "Not measured yet: `python -m benchmarks.accelerator_check`." in text


def test_machine_independent_sections_keep_only_the_newest_table(tmp_path, monkeypatch):
  log = tmp_path / "results.jsonl"
  monkeypatch.setenv("CFGDIFF_BENCHMARK_LOG", str(log))
  common.record("Model size", "python -m benchmarks.model_size --experiments a", ["x"], [["1"]])
  common.record("Model size", "python -m benchmarks.model_size --experiments b", ["x"], [["2"]])
  shown = page.current(page.load(str(log)))["Model size"]
  assert [e["rows"] for e in shown] == [[["2"]]]


def test_record_writes_the_machine_and_the_notes(tmp_path, monkeypatch):
  monkeypatch.setenv("CFGDIFF_BENCHMARK_LOG", str(tmp_path / "log.jsonl"))
  entry = common.record("Sampling throughput (x)", "python -m benchmarks.sample_throughput",
                        ["variant", "images/s"], [["ddim", 1.5]], notes=["ratio 2.0."],
                        chip="NVIDIA H200")
  assert entry == page.load(str(tmp_path / "log.jsonl"))[0]
  assert entry["cpu"] == common.cpu_description()[0] and entry["rows"] == [["ddim", "1.5"]]
  text = page.render([entry])
  assert f"NVIDIA H200, host {os.cpu_count()} cores, {entry['cpu']}" in text
  assert "| ddim | 1.5 |\n\nratio 2.0." in text
