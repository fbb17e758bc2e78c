"""The noisy classifier and the other guidance methods end to end, through the real CLI:
--mode=train_classifier (checkpoints, resume, held-out accuracy by noise level), then
--mode=sample with classifier guidance and autoguidance, and the one-line refusals."""

import json
import os
import shutil

import numpy as np
import pytest

from tests.conftest import TINY_CONFIG, run_cli

CLASSIFIER = ["--config.classifier.ch=8", "--config.classifier.ch_mult=(1,2)",
              "--config.classifier.attn_resolutions=(4,)", "--config.classifier.head_channels=8",
              "--config.classifier.num_steps=30", "--config.classifier.batch_size=16",
              "--config.classifier.learning_rate=3e-3",
              # A mirror swaps the synthetic classes (left and right quadrants); ADM's
              # enlarge-and-crop keeps them.
              "--config.classifier.random_flip=False", "--config.classifier.random_crop=True",
              "--config.classifier.eval_logsnrs=(-8.0,0.0,6.0)",
              "--config.classifier.eval_examples=200", "--config.train.checkpoint_every_steps=15"]
SAMPLE = ["--mode=sample", "--config.sample.num_steps=4", "--config.sample.num_per_class=2",
          "--config.sample.guidance_weights=(0.0,3.0)", "--config.sample.batch_size=8"]


def _cli(data_dir, workdir, *extra):
  return run_cli(f"--config={TINY_CONFIG}", f"--config.data.path={data_dir}",
                 f"--workdir={workdir}", *extra)


@pytest.fixture(scope="module")
def denoiser_workdir(synthetic_data, tmp_path_factory):
  """A tiny denoiser with checkpoints at steps 6 and 12 (autoguidance's weak and strong)."""
  workdir = str(tmp_path_factory.mktemp("denoiser"))
  proc = _cli(synthetic_data, workdir, "--config.train.num_steps=12",
              "--config.train.checkpoint_every_steps=6")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def classifier_workdir(synthetic_data, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("classifier"))
  proc = _cli(synthetic_data, workdir, "--mode=train_classifier", *CLASSIFIER)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def test_classifier_trains_reports_accuracy_by_noise_level_and_resumes_bitwise(
    classifier_workdir, synthetic_data, tmp_path):
  from cfgdiff import checkpoint, configs
  config = configs.from_json(os.path.join(classifier_workdir, "config.json"))
  assert config.model.kind == "noisy_classifier" and config.model.ch == 8
  assert config.train.weight_decay == 0.05 and config.train.anneal_lr
  assert checkpoint.saved_steps(classifier_workdir)[-1] == 30

  with open(os.path.join(classifier_workdir, "classifier_eval.json")) as f:
    report = json.load(f)
  assert report["split"] == "test" and report["examples"] == 200 and report["step"] == 30
  assert report["logsnr"] == [-8.0, 0.0, 6.0]
  accuracy = report["accuracy"]
  # The synthetic classes (a bright quadrant each) are plain at low noise and lost at
  # l = -8 (alpha = 0.018): the classifier must learn the first and cannot the second.
  assert accuracy[2] > 0.9 and accuracy[0] < 0.5 and accuracy[0] <= accuracy[1] <= accuracy[2]
  assert all(loss > 0 for loss in report["loss"])

  # Resume: drop the last checkpoint and run the same command again.
  copy = str(tmp_path / "resumed")
  shutil.copytree(classifier_workdir, copy)
  shutil.rmtree(os.path.join(copy, "checkpoints", "30"))
  proc = _cli(synthetic_data, copy, "--mode=train_classifier", *CLASSIFIER)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "from step 15" in proc.stderr
  from cfgdiff import build
  mesh = build.make_mesh()
  target = build.abstract_state(config, build.make_model(config),
                                build.make_optimizer(config.train), mesh)
  states = []
  for workdir in (classifier_workdir, copy):
    reader = checkpoint.Checkpointer(workdir, read_only=True)
    states.append(reader.restore(target, 30)[0])
    reader.close()
  from tests.conftest import max_abs_difference
  assert max_abs_difference(states[0].params, states[1].params) == 0.0


def test_sample_with_classifier_guidance_and_autoguidance(denoiser_workdir, classifier_workdir,
                                                          synthetic_data):
  proc = _cli(synthetic_data, denoiser_workdir, *SAMPLE, "--config.sample.guidance=classifier",
              f"--config.sample.classifier_workdir={classifier_workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Guidance 'classifier' by {classifier_workdir} step 30" in proc.stderr
  proc = _cli(synthetic_data, denoiser_workdir, *SAMPLE, "--config.sample.guidance=auto",
              "--config.sample.weak_step=6")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Guidance 'auto' by {denoiser_workdir} step 6" in proc.stderr
  out = os.path.join(denoiser_workdir, "samples")
  assert {"classifier_w0.0.png", "classifier_w3.0.npz", "auto_w0.0.npz", "auto_w3.0.png"} <= set(
      os.listdir(out))
  load = lambda name: np.load(os.path.join(out, name))["images"]
  for method in ("classifier", "auto"):
    # Weight 0 is the strong, conditional model alone under both methods: the same images.
    np.testing.assert_array_equal(load(f"{method}_w0.0.npz"), load("auto_w0.0.npz"))
    assert not np.array_equal(load(f"{method}_w3.0.npz"), load(f"{method}_w0.0.npz"))


def _with_config(workdir, tmp_path, folder_name, **data_changes):
  """A copy of ``workdir``'s config.json (only) in a new folder, with data.* changed."""
  folder = tmp_path / folder_name
  folder.mkdir()
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  saved["data"].update(data_changes)
  (folder / "config.json").write_text(json.dumps(saved))
  return str(folder)


def test_bad_guidance_input_is_one_line(denoiser_workdir, classifier_workdir, synthetic_data,
                                        tmp_path):
  from cfgdiff import configs, guide_networks
  from tests import tiny_config
  config = tiny_config.get_config()
  config.data.path = synthetic_data

  def refusal(**sample):
    config.sample.update(sample)
    with pytest.raises(configs.ConfigError) as e:
      guide_networks.resolve_guide_helper(config, denoiser_workdir, None, 12)
    config.sample.update(configs.default_config().sample)
    return str(e.value)

  assert "needs sample.classifier_workdir" in refusal(guidance="classifier")
  other_classes = _with_config(classifier_workdir, tmp_path, "other_classes", num_classes=7)
  message = refusal(guidance="classifier", classifier_workdir=other_classes)
  assert "trained for data.num_classes 7 (not 4)" in message
  assert "--mode=train_classifier" in message
  other_size = _with_config(classifier_workdir, tmp_path, "other_size", image_size=16)
  assert "data.image_size 16 (not 8)" in refusal(guidance="classifier",
                                                 classifier_workdir=other_size)
  assert "not a noisy classifier" in refusal(guidance="classifier",
                                             classifier_workdir=denoiser_workdir)
  other_data = _with_config(denoiser_workdir, tmp_path, "other_data", name="cifar10",
                            channels=3)
  message = refusal(guidance="auto", weak_workdir=other_data)
  assert "data.name 'cifar10'" in message and "same data and noise schedule" in message
  assert "set sample.weak_step to one of [6, 12]" in refusal(guidance="auto")
  assert "is not earlier than the sampled step 12" in refusal(guidance="auto", weak_step=12)
  assert "sample.weak_step=5 is not a checkpoint" in refusal(guidance="auto", weak_step=5)
  assert "not a trained workdir" in refusal(guidance="classifier",
                                           classifier_workdir=str(tmp_path / "nothing"))

  proc = _cli(synthetic_data, denoiser_workdir, *SAMPLE, "--config.sample.guidance=clasifier")
  assert proc.returncode == 2 and "config.sample.guidance='clasifier' is invalid: must be one " \
      "of ('cfg', 'classifier', 'auto')" in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


SWEEP = ["--mode=sweep", "--config.sweep.guidance_weights=(0.0,3.0)",
         "--config.sweep.classifier_weights=(0.0,3.0)", "--config.sweep.auto_weights=(0.0,3.0)",
         "--config.sweep.num_samples=16", "--config.sweep.sampler=ddim",
         "--config.sweep.num_steps=4", "--config.sweep.classifier_epochs=2",
         "--config.sweep.bootstrap=20", "--config.sample.batch_size=8"]


def test_one_sweep_compares_the_three_methods(denoiser_workdir, classifier_workdir,
                                              synthetic_data):
  from cfgdiff import samplers
  from cfgdiff.sweep import store
  proc = _cli(synthetic_data, denoiser_workdir, *SWEEP,
              "--config.sweep.methods=('cfg','classifier','auto')",
              f"--config.sample.classifier_workdir={classifier_workdir}",
              "--config.sample.weak_step=6")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = os.path.join(denoiser_workdir, "sweep")
  rows = store.read_results(os.path.join(out, "results.csv"))
  assert sorted((r["method"], float(r["w"])) for r in rows) == sorted(
      (m, w) for m in ("cfg", "classifier", "auto") for w in (0.0, 3.0))
  by = {(r["method"], float(r["w"])): r for r in rows}
  assert all(int(r["step"]) == 12 for r in rows)
  assert by["classifier", 3.0]["guide_by"] == (f"{classifier_workdir} step 30, conditional "
                                               "denoiser")
  assert by["auto", 3.0]["guide_by"] == f"{denoiser_workdir} step 6"
  # At weight 0 every method is the conditional model alone: the same images, the same
  # scores, on the same seeds and labels.
  assert by["cfg", 0.0]["fid"] == by["classifier", 0.0]["fid"] == by["auto", 0.0]["fid"]
  assert len({by[m, 3.0]["fid"] for m in ("cfg", "classifier", "auto")}) == 3
  forward = samplers.network_evaluations("ddim", 4)
  assert {r["nfe_per_sample"] for r in rows} == {str(forward)}
  assert by["classifier", 3.0]["backward_per_sample"] == str(forward // 2)
  assert by["cfg", 3.0]["backward_per_sample"] == by["auto", 3.0]["backward_per_sample"] == "0"
  assert all(float(r["seconds_per_sample"]) > 0 for r in rows)
  table = open(os.path.join(out, "results.md")).read()
  for heading in ("### Classifier-free guidance:", "### Classifier guidance by ",
                  "### Autoguidance by ", "### Guidance methods compared:",
                  "**FID at matched class accuracy**"):
    assert heading in table, table
  run = os.path.basename(denoiser_workdir)
  for stem in (f"{run}_w3.0", f"{run}_classifier_w3.0", f"{run}_auto_w3.0"):
    assert os.path.exists(os.path.join(out, f"{stem}.png")), os.listdir(out)
  assert os.path.getsize(os.path.join(out, "tradeoff.png")) > 1000

  # Nothing more to do: the same command evaluates nothing again.
  again = _cli(synthetic_data, denoiser_workdir, *SWEEP,
               "--config.sweep.methods=('cfg','classifier','auto')",
               f"--config.sample.classifier_workdir={classifier_workdir}",
               "--config.sample.weak_step=6")
  assert again.returncode == 0 and "cells to evaluate" not in again.stderr, again.stderr[-2000:]

  # A method that lacks its network is refused in one line before anything compiles.
  proc = _cli(synthetic_data, denoiser_workdir, *SWEEP,
              "--config.sweep.methods=('cfg','classifier')")
  assert proc.returncode == 2 and "needs sample.classifier_workdir" in proc.stderr
  assert "Traceback" not in proc.stderr and "cells to evaluate" not in proc.stderr
  proc = _cli(synthetic_data, denoiser_workdir, *SWEEP, "--config.sweep.methods=('cfg','cg')")
  assert proc.returncode == 2 and "config.sweep.methods=('cfg', 'cg') is invalid" in proc.stderr
