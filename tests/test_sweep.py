"""--mode=sweep end to end through the CLI on two tiny runs (two p_uncond values):
the table, the plot, the grids, and resuming without redoing finished cells."""

import csv
import json
import os
import shutil
import signal
import time

import numpy as np
import pytest

from cfgdiff import configs
from cfgdiff.sweep import orchestrate, report, store
from tests.conftest import TINY_CONFIG, run_cli, start_cli_processes, wait_cli_processes

SWEEP_ARGS = ["--mode=sweep", "--config.sweep.guidance_weights=(0.0,3.0)",
              "--config.sweep.num_samples=24", "--config.sweep.sampler=ddim",
              "--config.sweep.num_steps=4", "--config.sweep.classifier_epochs=2",
              "--config.sample.batch_size=8"]


@pytest.fixture(scope="module")
def swept(synthetic_data, tmp_path_factory):
  root = str(tmp_path_factory.mktemp("table"))
  common = [f"--config={TINY_CONFIG}", f"--config.data.path={synthetic_data}"]
  for p in ("0.1", "0.5"):
    proc = run_cli(*common, f"--workdir={root}/p_uncond_{p}", f"--config.diffusion.p_uncond={p}",
                   "--config.train.num_steps=20")
    assert proc.returncode == 0, proc.stderr[-3000:]
  proc = run_cli(*common, f"--workdir={root}", *SWEEP_ARGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return root, common, proc


def test_sweep_writes_table_plot_and_grids(swept):
  root, _, proc = swept
  out = os.path.join(root, "sweep")
  rows = store.read_results(os.path.join(out, "results.csv"))
  assert len(rows) == 4
  assert set(store.COLUMNS) <= set(rows[0])
  assert {(r["run"], float(r["p_uncond"]), float(r["w"])) for r in rows} == {
      (f"p_uncond_{p}", float(p), w) for p in ("0.1", "0.5") for w in (0.0, 3.0)}
  for r in rows:
    assert float(r["fid"]) >= 0 and float(r["fid_floor"]) >= 0
    assert 0 <= float(r["precision"]) <= 1 and 0 <= float(r["recall"]) <= 1
    assert 0 <= float(r["accuracy"]) <= 1 and 1 <= float(r["is_mean"]) <= 4
    assert r["sampler"] == "ddim" and int(r["steps"]) == 4 and int(r["num_samples"]) == 24
    assert int(r["step"]) == 20
    # Every metric has a bootstrap standard error, and its replicates are kept.
    assert all(float(r[f"{m}_se"]) > 0 for m in ("fid", "is_mean", "accuracy")), r
    assert os.path.exists(store.replicates_path(out, r))
  table = open(os.path.join(out, "results.md")).read()
  assert "| w | p_uncond=0.1 | p_uncond=0.5 |" in table and "| 3 |" in table
  assert "floor" in table and table.strip() in proc.stdout
  assert " ± " in table and "test accuracy" in table
  assert "| p_uncond=0.5 | 0 → 3 |" in table, table  # the paired change between weights
  assert os.path.getsize(os.path.join(out, "tradeoff.png")) > 1000
  assert os.path.exists(os.path.join(out, "p_uncond_0.5_w3.0.png"))
  assert os.path.exists(os.path.join(out, "classifier", "classifier.msgpack"))
  assert "ETA" in proc.stderr


def test_interrupted_sweep_resumes_without_redoing_cells(swept):
  root, common, _ = swept
  path = os.path.join(root, "sweep", "results.csv")
  rows = store.read_results(path)
  kept = [r for r in rows if not (r["run"] == "p_uncond_0.1" and float(r["w"]) == 3.0)]
  with open(path, "w", newline="") as f:  # as if the run died before the last cell
    writer = csv.DictWriter(f, fieldnames=store.COLUMNS)
    writer.writeheader()
    writer.writerows(kept)
  proc = run_cli(*common, f"--workdir={root}", *SWEEP_ARGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "1 cells to evaluate (3 already done)" in proc.stderr
  assert "Training the evaluation classifier" not in proc.stderr, "classifier is cached"
  again = store.read_results(path)
  assert len(again) == 4 and again[:3] == kept
  redone = again[3]
  original = next(r for r in rows if r["run"] == "p_uncond_0.1" and float(r["w"]) == 3.0)
  # The same seeds and labels give the same cell again.
  np.testing.assert_allclose(float(redone["fid"]), float(original["fid"]), rtol=1e-3)


def test_sweep_without_runs_is_refused(synthetic_data, tmp_path):
  proc = run_cli(f"--config={TINY_CONFIG}", f"--config.data.path={synthetic_data}",
                 f"--workdir={tmp_path}", *SWEEP_ARGS)
  assert proc.returncode == 2
  assert "no training run under" in proc.stderr.strip().splitlines()[-1]


def test_polling_sweep_evaluates_new_checkpoints_until_training_ends(synthetic_data, tmp_path):
  import subprocess
  import sys

  from tests.conftest import ROOT
  workdir = str(tmp_path / "run")
  common = [f"--config={TINY_CONFIG}", f"--config.data.path={synthetic_data}",
            f"--workdir={workdir}"]
  # Training writes checkpoints at steps 30 and 60 while the sweep polls every 2 s.
  trainer = subprocess.Popen(
      [sys.executable, "-m", "cfgdiff.main", *common, "--config.train.num_steps=60",
       "--config.train.checkpoint_every_steps=30"], cwd=ROOT, stderr=subprocess.DEVNULL,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  sweeper = run_cli(*common, *SWEEP_ARGS[:-1], "--config.sweep.poll_seconds=2")
  assert trainer.wait(timeout=600) == 0
  assert sweeper.returncode == 0, sweeper.stderr[-3000:]
  steps = [int(r["step"]) for r in store.read_results(os.path.join(workdir, "sweep",
                                                                   "results.csv"))]
  assert steps[-1] == 60 and steps == sorted(steps), steps
  assert "waiting 2 s for new checkpoints" in sweeper.stderr or len(steps) == 1


def _with_a_stopped_run(swept, tmp_path) -> str:
  """A copy of the swept runs in which p_uncond_0.5 was meant to train 40 steps but its
  job died at step 20 (no lock, no new checkpoint)."""
  root = shutil.copytree(swept[0], str(tmp_path / "copy"))
  path = os.path.join(root, "p_uncond_0.5", "config.json")
  with open(path) as f:
    run_config = json.load(f)
  run_config["train"]["num_steps"] = 40
  with open(path, "w") as f:
    json.dump(run_config, f)
  return root


def test_polling_sweep_ends_in_one_line_when_a_run_stopped_unfinished(swept, tmp_path):
  root = _with_a_stopped_run(swept, tmp_path)
  proc = run_cli(*swept[1], f"--workdir={root}", *SWEEP_ARGS, "--config.sweep.poll_seconds=1",
                 "--config.sweep.dead_run_seconds=3")
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert "the sweep stopped polling: p_uncond_0.5: its training stopped at step 20 of 40" in last
  assert "p_uncond_0.1" not in last, "the finished run is not reported"
  assert os.path.exists(os.path.join(root, "sweep", "results.md")), "its table is written"


def test_multihost_polling_sweep_exits_75_on_sigterm(swept, tmp_path):
  root = _with_a_stopped_run(swept, tmp_path)
  logs = str(tmp_path / "logs")
  (job,) = start_cli_processes(1, *swept[1], f"--workdir={root}", *SWEEP_ARGS,
                               "--config.sweep.poll_seconds=1",
                               "--config.sweep.dead_run_seconds=100000", log_dir=logs)
  log = os.path.join(logs, "process_0.log")
  deadline = time.monotonic() + 300
  while "waiting 1 s for new checkpoints" not in open(log).read():
    assert job.poll() is None and time.monotonic() < deadline, open(log).read()[-3000:]
    time.sleep(0.2)
  job.send_signal(signal.SIGTERM)
  (text,) = wait_cli_processes([job], logs, timeout=120, expected_code=75)
  assert "Preempted (SIGTERM): nothing was being evaluated" in text


def test_each_traced_option_is_declared_once_and_reaches_sampler_api_and_checks():
  import dataclasses
  import inspect

  from cfgdiff import api, samplers
  declared = configs.TRACED_SAMPLE_OPTIONS
  assert {f.name for f in dataclasses.fields(samplers.GuidanceOptions)} == {
      o.field for o in declared}
  assert {o.field for o in declared} <= set(inspect.signature(api.Model.sample).parameters)
  sample = configs.default_config().sample
  sample.update(v=0.7, guidance_interval=(-2.0, 3.0), rescale=0.25, threshold=0.5,
                clip_x=False)
  options = samplers.GuidanceOptions.from_config(sample)
  for o in declared:
    np.testing.assert_allclose(np.asarray(getattr(options, o.field)), sample[o.key], rtol=1e-7)
  # Each check refuses a bad value in one line naming the key (ConfigDict itself refuses
  # a non-bool clip_x).
  for o in (o for o in declared if o.key != "clip_x"):
    bad = configs.default_config().sample
    bad[o.key] = {"guidance_interval": (3.0, -2.0)}.get(o.key, 1.5)
    with pytest.raises(configs.ConfigError, match=f"config.sample.{o.key}="):
      configs.validate_sample(bad)


def test_every_sample_setting_is_part_of_a_cell_and_tables_never_mix_settings():
  from tests import tiny_config
  config = tiny_config.get_config()
  config.sweep.guidance_weights = (0.0, 1.0)
  run = orchestrate.Run("p_uncond_0.1", "unused", config)
  scores = dict(fid="5.0", fid_se="0.3", fid_floor="1.0", is_mean="2.0", is_mean_se="0.1",
                precision="0.5", recall="0.5", accuracy="0.7")
  rows = [dict(run=run.name, step="7", p_uncond="0.1", w=str(w), **store.settings(config),
               **scores) for w in (0.0, 1.0)]
  # Round trip through the CSV, as a resumed sweep reads it.
  done = {store.cell_key(r) for r in rows}
  missing_weights = lambda step, done, config: [w for _, w, _ in orchestrate.missing_cells(
      run, step, done, config)]
  assert missing_weights(7, done, config) == []
  assert missing_weights(8, done, config) == [0.0, 1.0]
  # Rows written before the method column existed were classifier-free guidance's.
  assert missing_weights(7, {store.cell_key({k: v for k, v in r.items() if k != "method"})
                             for r in rows}, config) == []
  # A valid non-default value of each traced option; an option declared without one here
  # fails the test instead of going unchecked.
  other = {"v": 0.5, "rescale": 0.7, "threshold": 0.99, "clip_x": False,
           "guidance_interval": (-5.0, 5.0)}
  assert set(other) == {o.key for o in configs.TRACED_SAMPLE_OPTIONS}
  for option in configs.TRACED_SAMPLE_OPTIONS:
    changed = config.copy_and_resolve_references()
    changed.sample[option.key] = other[option.key]
    configs.validate_sample(changed.sample)
    assert missing_weights(7, done, changed) == [0.0, 1.0], option.key
  for key, value in (("seed", 1), ("sweep.bootstrap", 50), ("sweep.score_splits", 2)):
    changed = config.copy_and_resolve_references()
    changed.update_from_flattened_dict({key: value})
    assert missing_weights(7, done, changed) == [0.0, 1.0], key
  # A row scored by an older version of the metrics is never reused.
  old = {store.cell_key(dict(r, metrics="")) for r in rows}
  assert missing_weights(7, old, config) == [0.0, 1.0]
  changed = config.copy_and_resolve_references()
  changed.sample.v = 0.5
  rows += [dict(r, **store.settings(changed)) for r in rows]
  table = report.results_markdown(rows, {k: 1.0 for k in ("fid", "is_mean", "precision",
                                                          "recall", "accuracy")})
  assert table.count("### Classifier-free guidance:") == 2
  assert "v=0.5" in table and "v=0.3" in table
  assert table.count("| 1 | 5.00 ± 0.30 |") == 2, table  # one w=1 row per setting's FID table


def test_changes_between_weights_carry_paired_errors_and_are_marked_when_resolved():
  from tests import tiny_config
  config = tiny_config.get_config()
  rng = np.random.default_rng(0)
  shared = rng.normal(size=200)  # the replicates of both cells move together (same seeds)
  cells = {0.0: (60.0, shared * 3), 1.0: (62.0, shared * 3 + 0.1 * rng.normal(size=200)),
           2.0: (62.1, shared * 3 + 2.0 * rng.normal(size=200))}
  rows, replicates = [], {}
  for w, (fid, noise) in cells.items():
    rows.append(dict(run="r", step="9", p_uncond="0.2", w=str(w), **store.settings(config),
                     fid=str(fid), fid_se="3.0", is_mean="2.0", precision="0.5", recall="0.5",
                     accuracy="0.7"))
    replicates[store.cell_key(rows[-1])] = {"fid": fid + noise}
  table = report.results_markdown(rows, {}, replicates)
  lines = {line.split("|")[2].strip(): line for line in table.splitlines()
           if line.startswith("| p_uncond=0.2 |")}
  # 60 -> 62 with paired error ~0.1: resolved, though each FID has an error of 3.
  error = np.std(cells[1.0][1] - cells[0.0][1], ddof=1)
  assert f"+2.00 ± {error:.2f} *" in lines["0 → 1"]
  # 62 -> 62.1 with paired error ~2: not resolved, no mark.
  assert "+0.10 ± " in lines["1 → 2"] and "*" not in lines["1 → 2"]


def test_changes_between_p_uncond_at_each_weight_are_paired():
  from tests import tiny_config
  config = tiny_config.get_config()
  rng = np.random.default_rng(1)
  shared = rng.normal(size=200)
  rows, replicates = [], {}
  for run, p, fid, noise in (("a", "0.1", 20.0, shared), ("b", "0.5", 23.0, shared + 0.2 *
                                                           rng.normal(size=200))):
    rows.append(dict(run=run, step="9", p_uncond=p, w="1.0", **store.settings(config),
                     fid=str(fid), fid_se="2.0", is_mean="2.0", precision="0.5", recall="0.5",
                     accuracy="0.7"))
    replicates[store.cell_key(rows[-1])] = {"fid": fid + 2.0 * noise}
  table = report.results_markdown(rows, {}, replicates)
  assert "Change between adjacent weights" not in table  # one weight per run
  line = next(x for x in table.splitlines() if x.startswith("| 1 | p_uncond=0.1 → p_uncond=0.5"))
  error = np.std(replicates[store.cell_key(rows[1])]["fid"]
                 - replicates[store.cell_key(rows[0])]["fid"], ddof=1)
  assert f"+3.00 ± {error:.2f} *" in line, line
  # A cell evaluated in this process (typed values) joins the rows as results.csv gives them
  # back, so it is compared with the cells read from the file, not silently skipped.
  fresh = dict(rows[1], step=9, w=1.0, fid=23.0, fid_se=2.0)
  assert store.as_written(fresh) == rows[1]
  assert f"+3.00 ± {error:.2f} *" in report.results_markdown(
      [rows[0], store.as_written(fresh)], {}, replicates)
  rows[1]["p_uncond"] = "0.1"  # two runs of one p_uncond: no p_uncond change to report
  assert "Change between adjacent p_uncond" not in report.results_markdown(rows, {}, replicates)
  rows[1]["p_uncond"] = "0.5"
  rows[1]["step"] = "8"  # a run still training is not compared (re-keyed: the key has the step)
  assert "Change between adjacent p_uncond" not in report.results_markdown(
      rows, {}, {store.cell_key(r): replicates[k] for r, k in zip(
          rows, replicates, strict=True)})


def test_rows_are_written_and_read_back_as_they_are_kept(tmp_path):
  fresh = dict(run="a", step=9, w=0.5, fid=20.25, clip_x=False, rescale=None)
  path = str(tmp_path / "results.csv")
  store.write_results(path, [store.as_written(fresh)])
  (back,) = store.read_results(path)
  assert {k: back[k] for k in fresh} == store.as_written(fresh)
  assert store.as_written(fresh)["step"] == "9" and store.as_written(fresh)["rescale"] == ""


def test_paired_change_without_comparable_replicates_is_no_row():
  a = dict(run="a", step="9", w="1.0", fid="20.0")
  b = dict(run="a", step="9", w="2.0", fid="22.0")
  draws = np.arange(200.0)
  comparable = {store.cell_key(a): {"fid": draws}, store.cell_key(b): {"fid": draws + 1}}
  assert report.paired_changes(a, b, comparable)[0].startswith("+2.00 ± 0.00 *")
  other_counts = {store.cell_key(a): {"fid": draws}, store.cell_key(b): {"fid": draws[:100]}}
  assert report.paired_changes(a, b, other_counts) is None


def test_crossing_interpolates_between_adjacent_weights():
  from cfgdiff.sweep import compare
  weights, accuracy, fid = [0.0, 2.0, 4.0], [0.5, 0.6, 1.0], [10.0, 9.0, 20.0]
  assert compare.crossing(weights, accuracy, fid, 0.7) == pytest.approx((2.5, 11.75))
  assert compare.crossing(weights, accuracy, fid, 0.5) == (0.0, 10.0)
  assert compare.crossing(weights, accuracy, fid, 0.4) is None
  # Not monotone: the first crossing in weight order.
  assert compare.crossing([0.0, 1.0, 2.0], [0.2, 0.8, 0.4], [1.0, 2.0, 3.0], 0.5) == \
      pytest.approx((0.5, 1.5))


def test_methods_are_compared_at_matched_accuracy_with_paired_errors():
  """Classifier-free guidance at w = 0, 1, 2 (accuracy 0.5, 0.7, 0.9) against classifier
  guidance at s = 0, 2, 4 (accuracy 0.5, 0.6, 1.0): at accuracy 0.7 the classifier curve
  is a quarter of the way from s = 2 to s = 4. The paired error is checked against the
  same interpolation done independently (np.interp) on each bootstrap replicate."""
  from tests import tiny_config
  config = tiny_config.get_config()
  rng = np.random.default_rng(3)
  shared = rng.normal(size=(2, 200))  # moves every cell alike: the same seeds and labels
  curves = {"cfg": [(0.0, 0.5, 10.0), (1.0, 0.7, 8.0), (2.0, 0.9, 12.0)],
            "classifier": [(0.0, 0.5, 10.0), (2.0, 0.6, 9.0), (4.0, 1.0, 20.0)]}
  rows, replicates = [], {}
  for method, cells in curves.items():
    guide_by = "cls step 30, conditional denoiser" if method == "classifier" else ""
    for w, accuracy, fid in cells:
      rows.append(dict(run="r", step="9", p_uncond="0.1", w=str(w),
                       **store.settings(config, method, guide_by.split(",")[0]), fid=str(fid),
                       fid_se="1.0", is_mean="2.0", precision="0.5", recall="0.5",
                       accuracy=str(accuracy), nfe_per_sample="8",
                       backward_per_sample="4" if method == "classifier" else "0",
                       seconds_per_sample="0.5"))
      noise = 0.01 * rng.normal(size=(2, 200))
      replicates[store.cell_key(rows[-1])] = {"fid": fid + shared[0] + 5 * noise[0],
                                              "accuracy": accuracy + 0.01 * shared[1]
                                              + noise[1]}
  table = report.results_markdown(rows, {}, replicates)
  assert "### Classifier-free guidance:" in table
  assert "### Classifier guidance by cls step 30, conditional denoiser:" in table
  assert "| s | p_uncond=0.1 |" in table  # the classifier's weight is its scale s
  assert "| Classifier-free guidance | 8.00 ± 1.00 | w=1 | 0.700 |" in table
  assert "| Classifier guidance | 9.00 ± 1.00 | s=2 | 0.600 | 2.00 | 8 | 4 | 0.5 |" in table

  def reference_replicates(w):
    return replicates[store.cell_key(next(r for r in rows if r["method"] == "cfg"
                                          and float(r["w"]) == w))]
  theirs = [replicates[store.cell_key(r)] for r in rows if r["method"] == "classifier"]
  for w, expected_s, expected_fid in ((1.0, 2.5, 11.75), (2.0, 3.5, 17.25)):
    own = reference_replicates(w)
    differences = [np.interp(own["accuracy"][b], [t["accuracy"][b] for t in theirs],
                             [t["fid"][b] for t in theirs]) - own["fid"][b] for b in range(200)]
    error = np.std(differences, ddof=1)
    _, accuracy, fid = curves["cfg"][int(w)]
    change = expected_fid - fid
    line = next(x for x in table.splitlines()
                if x.startswith(f"| {w:g} | {accuracy:.3f} | {fid:.2f} |"))
    expected = f"| {expected_s:.3g} | {expected_fid:.2f} | {change:+.2f} ± {error:.2f} *"
    assert expected in line, (line, error)
    assert 0.01 < error < 0.5  # paired: far below the FIDs' own errors of 1.0
  # At w = 0 both curves start at the conditional model's accuracy.
  assert "| 0 | 0.500 | 10.00 | 0 | 10.00 | +0.00" in table
