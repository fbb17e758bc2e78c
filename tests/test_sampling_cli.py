"""--mode=sample end to end on a tiny trained checkpoint, through the real CLI."""

import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY_CONFIG, run_cli, xla_flags

SAMPLE_ARGS = ["--config.sample.num_steps=4", "--config.sample.num_per_class=2",
               "--config.sample.guidance_weights=(0.0,2.0)", "--config.sample.batch_size=6"]


@pytest.fixture(scope="module")
def trained_workdir(synthetic_data, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("trained"))
  proc = run_cli(f"--config={TINY_CONFIG}", f"--config.data.path={synthetic_data}",
                 f"--workdir={workdir}", "--config.train.num_steps=40")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _sample(workdir, data_dir, *extra):
  return run_cli(f"--config={TINY_CONFIG}", f"--config.data.path={data_dir}",
                 f"--workdir={workdir}", "--mode=sample", *SAMPLE_ARGS, *extra)


def test_sample_mode_writes_grids_and_arrays_the_same_on_any_device_count(
    trained_workdir, synthetic_data, tmp_path):
  proc = _sample(trained_workdir, synthetic_data, "--config.runtime.cpu_devices=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = os.path.join(trained_workdir, "samples")
  assert sorted(os.listdir(out)) == ["w0.0.npz", "w0.0.png", "w2.0.npz", "w2.0.png"]
  for w in ("0.0", "2.0"):
    arrays = np.load(os.path.join(out, f"w{w}.npz"))
    assert arrays["images"].shape == (8, 8, 8, 1) and arrays["images"].dtype == np.uint8
    np.testing.assert_array_equal(arrays["labels"], np.repeat(np.arange(4), 2))
    grid = Image.open(os.path.join(out, f"w{w}.png"))
    assert grid.size[1] == 4 * (16 + 2)  # one row per class, tiles upscaled 2x
  assert "ETA" in proc.stderr
  a, b = (np.load(os.path.join(out, f"w{w}.npz"))["images"] for w in ("0.0", "2.0"))
  assert not np.array_equal(a, b), "w must change the images"
  # The same checkpoint sampled on one device gives the same images up to float
  # rounding (a uint8 step at most): noise is keyed per image, not per device.
  other = str(tmp_path / "copy")
  shutil.copytree(trained_workdir, other, ignore=shutil.ignore_patterns("samples"))
  assert _sample(other, synthetic_data, "--config.runtime.cpu_devices=1").returncode == 0
  c = np.load(os.path.join(other, "samples", "w2.0.npz"))["images"]
  assert np.max(np.abs(c.astype(int) - b.astype(int))) <= 1
  assert np.mean(c == b) > 0.99


@pytest.mark.parametrize("override, message", [
    ("--config.sample.sampler=euler", "config.sample.sampler='euler' is invalid"),
    ("--config.sample.guidance_weights=(0.0,nan)", "must be a non-empty tuple of finite"),
])
def test_bad_sample_config_is_refused(trained_workdir, synthetic_data, override, message):
  proc = _sample(trained_workdir, synthetic_data, override)
  assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_missing_checkpoint_is_refused(synthetic_data, tmp_path):
  proc = _sample(str(tmp_path / "empty"), synthetic_data)
  assert proc.returncode != 0
  assert "cfgdiff: error: no checkpoint in" in proc.stderr
  assert not os.path.exists(tmp_path / "empty"), "a failed read leaves nothing behind"


def test_label_out_of_range_is_refused(trained_workdir, synthetic_data):
  from cfgdiff import sampling
  from tests import tiny_config
  config = tiny_config.get_config()
  config.data.path = synthetic_data
  sampler = sampling.CheckpointSampler(config, trained_workdir)
  with pytest.raises(ValueError, match=r"label 4 is out of range: labels must lie in \[0, 4\)"):
    sampler.sample([0, 4], 1.0)
  with pytest.raises(ValueError, match="guidance weight must be finite"):
    sampler.sample([0, 1], float("inf"))


def _run_notebook(workdir: str, monkeypatch) -> str:
  """Executes notebooks/sampling.ipynb headless as a user would (4 steps, 2 weights);
  returns its printed text after checking it drew one grid per w and the side-by-side."""
  import nbformat
  from nbclient import NotebookClient

  from tests.conftest import ROOT
  monkeypatch.setenv("CFGDIFF_WORKDIR", workdir)
  monkeypatch.setenv("CFGDIFF_WEIGHTS", "0,3")
  monkeypatch.setenv("CFGDIFF_NUM_PER_CLASS", "2")
  monkeypatch.setenv("CFGDIFF_NUM_STEPS", "4")
  monkeypatch.setenv("XLA_FLAGS", xla_flags("--xla_force_host_platform_device_count=1"))
  monkeypatch.setenv("PYTHONPATH", ROOT)
  notebook = nbformat.read(os.path.join(ROOT, "notebooks", "sampling.ipynb"), as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": ROOT}}).execute()
  images = [o for cell in notebook.cells if cell.cell_type == "code"
            for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 3, "one grid per w and the side-by-side view"
  return "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                 for o in cell.get("outputs", []))


def test_sampling_notebook_runs_headless_on_a_workdir(trained_workdir, monkeypatch):
  text = _run_notebook(trained_workdir, monkeypatch)
  assert "EMA parameters from step 40" in text and "guidance scale s = 4.0" in text


def test_sampling_notebook_needs_no_training(tmp_path, monkeypatch):
  """With no workdir of one's own, the notebook samples the shipped reference model."""
  from cfgdiff import reference
  step = reference.load("fashion_mnist").step
  text = _run_notebook(str(tmp_path / "never_trained"), monkeypatch)
  assert f"the shipped reference model, EMA parameters from step {step}" in text, text
  assert "10 classes" in text and "guidance scale s = 4.0" in text


def test_sampling_notebook_is_committed_with_its_pictures():
  """As GitHub and Colab show it before anything runs: the grids of its default run."""
  import nbformat

  from tests.conftest import ROOT
  notebook = nbformat.read(os.path.join(ROOT, "notebooks", "sampling.ipynb"), as_version=4)
  images = [o for cell in notebook.cells if cell.cell_type == "code"
            for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 5, "the one-class grid across w and one grid per default w (4)"


def test_exported_reference_samples_like_its_checkpoint(trained_workdir, synthetic_data,
                                                       tmp_path, monkeypatch):
  """A workdir exported as a reference model (`python -m cfgdiff.reference`) loads back
  to the same parameters, and --mode=sample falls back to it when WORKDIR has none."""
  import pathlib

  from cfgdiff import checkpoint, configs, reference, sampling
  root = pathlib.Path(tmp_path / "reference_models")
  manifest = reference.export(trained_workdir, "fashion_mnist", "tiny test run", root=root)
  assert manifest["step"] == 40 and np.isfinite(manifest["heldout_loss"])
  shipped = reference.load("fashion_mnist", root=root)
  config = configs.from_json(os.path.join(trained_workdir, "config.json"))
  from_checkpoint = sampling.CheckpointSampler(config, trained_workdir)
  for a, b in zip(jax.tree.leaves(shipped.params), jax.tree.leaves(from_checkpoint.params),
                  strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))
  monkeypatch.setattr(reference, "ROOT", root)
  empty = str(tmp_path / "no_run_yet")
  fallback = sampling._workdir_or_reference_sampler(config, empty)
  assert fallback.workdir is None and fallback.step == 40
  labels = np.arange(4)
  np.testing.assert_array_equal(
      fallback.sample(labels, 1.0, sampler="ddim", num_steps=2),
      from_checkpoint.sample(labels, 1.0, sampler="ddim", num_steps=2))
  # Nothing shipped for other data: the error names the missing checkpoint, as before.
  config.data.name = "imagenet_resized/64x64"
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in"):
    sampling._workdir_or_reference_sampler(config, empty)


def test_sample_local_is_this_process_share_of_sample(trained_workdir, synthetic_data):
  """What a sweep process scores (`sample_local`) is exactly its rows of `sample`: every
  position once (one process here), the padding of a partial last batch dropped."""
  from cfgdiff import configs, sampling
  config = configs.from_json(os.path.join(trained_workdir, "config.json"))
  config.data.path = synthetic_data
  config.sample.batch_size = 6
  sampler = sampling.CheckpointSampler(config, trained_workdir)
  labels = np.arange(10) % config.data.num_classes  # batches of 6 + 4 (2 padded)
  whole = sampler.sample(labels, 2.0, seed=3, sampler="ddim", num_steps=2, first_index=5)
  local, positions = sampler.sample_local(labels, 2.0, seed=3, sampler="ddim", num_steps=2,
                                          first_index=5)
  assert sorted(positions.tolist()) == list(range(10))
  np.testing.assert_array_equal(local, whole[positions])


def test_loading_another_step_reuses_the_compiled_sampler(trained_workdir, synthetic_data):
  """A polling sweep reloads each new checkpoint into its run's sampler: the images are
  those of a sampler made for that step, and nothing is traced or compiled again."""
  from cfgdiff import checkpoint, configs, samplers, sampling
  config = configs.from_json(os.path.join(trained_workdir, "config.json"))
  config.data.path = synthetic_data
  config.sample.batch_size = 6
  older, newest = checkpoint.saved_steps(trained_workdir)[-2:]
  labels = np.arange(6) % config.data.num_classes
  kwargs = dict(seed=1, sampler="ddim", num_steps=2)
  sampler = sampling.CheckpointSampler(config, trained_workdir, older)
  before = sampler.sample(labels, 1.0, **kwargs)
  spec = samplers.SamplerSpec("ddim", 2, config.sample.fused, config.diffusion.logsnr_min,
                              config.diffusion.logsnr_max)
  compiled = sampler._sample_fn(spec, "cfg")
  sampler.load(newest)
  after = sampler.sample(labels, 1.0, **kwargs)
  assert sampler.step == newest and sampler._sample_fn(spec, "cfg") is compiled
  assert compiled._cache_size() == 1, "loading a step must not trace the sampler again"
  fresh = sampling.CheckpointSampler(config, trained_workdir, newest)
  np.testing.assert_array_equal(after, fresh.sample(labels, 1.0, **kwargs))
  assert not np.array_equal(after, before), "the parameters must have changed"


def test_python_api_loads_a_workdir_or_one_of_its_checkpoints(trained_workdir):
  """cfgdiff.load on a workdir (its latest step) and on WORKDIR/checkpoints/STEP (that
  step), sampling what the CLI's sampler draws; a request of 2 compiles a batch of 2."""
  import cfgdiff
  from cfgdiff import checkpoint, configs, sampling
  older, newest = checkpoint.saved_steps(trained_workdir)[-2:]
  latest = cfgdiff.load(trained_workdir)
  pinned = cfgdiff.load(os.path.join(trained_workdir, "checkpoints", str(older)))
  assert (latest.step, pinned.step) == (newest, older)
  assert latest.image_shape == (8, 8, 1) and latest.config.data.num_classes == 4
  a = latest.sample([1, 2], w=2.0, steps=3, seed=5, sampler="ddim")
  b = pinned.sample([1, 2], w=2.0, steps=3, seed=5, sampler="ddim")
  assert a.shape == (2, 8, 8, 1) and a.dtype == np.uint8 and not np.array_equal(a, b)
  config = configs.from_json(os.path.join(trained_workdir, "config.json"))
  config.sample.batch_size = 2
  reference = sampling.CheckpointSampler(config, trained_workdir, older)
  np.testing.assert_array_equal(b, reference.sample([1, 2], 2.0, seed=5, sampler="ddim",
                                                    num_steps=3))
