"""The TFDS input on real ArrayRecord datasets that TFDS itself builds here
(tests/tfds_datasets.py): ImageNet 64 and ImageNet 2012 with ADM's crop read through the
training code, the one-line errors for a TFRECORD build, a missing split and a missing
dataset, the grain pipeline on them, and real training steps of a reduced-width
ImageNet-64 config with a resume."""

import io
import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cfgdiff import checkpoint, data, tfds_source, train
from experiments import get_experiment
from tests import tfds_datasets


@pytest.fixture(scope="module")
def imagenet64(tmp_path_factory):
  """(data_dir, train images, train labels) of an ArrayRecord imagenet_resized/64x64."""
  data_dir = str(tmp_path_factory.mktemp("imagenet64"))
  images, labels = tfds_datasets.build_imagenet_resized64(data_dir, num_train=32, num_val=8)
  return data_dir, images, labels


@pytest.fixture(scope="module")
def imagenet2012(tmp_path_factory):
  """(data_dir, {file name: (class, JPEG bytes)}) of an ArrayRecord imagenet2012."""
  data_dir = str(tmp_path_factory.mktemp("imagenet2012"))
  return data_dir, tfds_datasets.build_imagenet2012(data_dir, num_classes=3, per_class=4)


def _ids(images: np.ndarray) -> np.ndarray:
  """The example index tfds_datasets.resized64_arrays writes into pixel (0, 0)."""
  return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 0, 1].astype(int)


def test_imagenet64_arrayrecord_is_read_by_index(imagenet64):
  data_dir, images, labels = imagenet64
  source = tfds_source.TfdsSource("imagenet_resized/64x64", "train", data_dir, 64)
  assert len(source) == 32
  read_images, read_labels = source.read(np.arange(32))
  assert read_images.dtype == np.uint8 and read_labels.dtype == np.int32
  ids = _ids(read_images)
  assert sorted(ids) == list(range(32)), "every example exactly once"
  # Stored as PNG: bit-exact, and each label stays with its image.
  np.testing.assert_array_equal(read_images, images[ids])
  np.testing.assert_array_equal(read_labels, labels[ids])
  again, _ = tfds_source.TfdsSource("imagenet_resized/64x64", "train", data_dir, 64).read(
      np.array([5, 2]))
  np.testing.assert_array_equal(again, read_images[[5, 2]])
  val = tfds_source.TfdsSource("imagenet_resized/64x64", "validation", data_dir, 64)
  assert len(val) == 8


@pytest.mark.parametrize("size", [64, 128])
def test_imagenet2012_jpegs_get_adms_centre_crop(imagenet2012, size):
  """Every training JPEG (500x375, 375x500, 500x333, 640x480, 256x256, 300x200) comes out
  as ADM's crop of the original file, and that crop is the image's centre square."""
  data_dir, written = imagenet2012
  source = tfds_source.TfdsSource("imagenet2012", "train", data_dir, size)
  images, labels = source.read(np.arange(len(source)))
  assert images.shape == (12, size, size, 3) and images.dtype == np.uint8
  names = [ex["file_name"].decode() for ex in tfds.data_source(
      "imagenet2012", split="train", data_dir=data_dir)]
  assert sorted(names) == sorted(written)
  for image, label, name in zip(images, labels, names, strict=True):
    klass, jpeg = written[name]
    assert label == klass, "label ids follow TFDS's synset list"
    original = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    np.testing.assert_array_equal(image, data.center_crop_resize(original, size))
    # The centre square holds the class colour; the dark sides must be cropped away.
    diff = np.abs(image.astype(int) - tfds_datasets.PALETTE[klass])
    assert diff.mean() < 3, (name, diff.mean())
    assert diff[2:-2, 2:-2].max() < 60, (name, diff[2:-2, 2:-2].max())


def test_imagenet2012_validation_split_is_read(imagenet2012):
  data_dir, _ = imagenet2012
  source = tfds_source.TfdsSource("imagenet2012", "validation", data_dir, 64)
  images, labels = source.read(np.arange(len(source)))
  assert images.shape == (4, 64, 64, 3)
  assert np.all((labels >= 0) & (labels < 1000))


def _tree(path) -> list[str]:
  return sorted(os.path.join(root, f) for root, _, files in os.walk(path) for f in files)


def test_tfrecord_build_is_refused_with_the_rebuild_command(tmp_path):
  data_dir = str(tmp_path)
  tfds_datasets.build_imagenet_resized64(data_dir, num_train=8, num_val=8,
                                         file_format="tfrecord")
  before = _tree(data_dir)
  with pytest.raises(data.DataError) as e:
    tfds_source.TfdsSource("imagenet_resized/64x64", "train", data_dir, 64)
  message = str(e.value)
  assert "\n" not in message
  assert "was built as TFRECORD files" in message
  assert (f"tfds.builder('imagenet_resized/64x64', data_dir='{data_dir}', "
          "file_format='array_record').download_and_prepare()") in message
  assert f"tfds build imagenet_resized/64x64 --data_dir={data_dir} --file_format=array_record" \
      in message
  version_dir = os.path.join(data_dir, "imagenet_resized", "64x64", "0.1.0")
  assert f"tfds convert_format --dataset_version_dir={version_dir} " \
         "--out_file_format=array_record" in message
  assert _tree(data_dir) == before, "nothing written"


def test_missing_split_names_the_available_ones(imagenet64):
  data_dir, _, _ = imagenet64
  with pytest.raises(data.DataError) as e:
    tfds_source.TfdsSource("imagenet_resized/64x64", "test", data_dir, 64)
  assert "\n" not in str(e.value)
  assert "has no split 'test'; its splits are ['train', 'validation']" in str(e.value)


@pytest.mark.parametrize("name", ["imagenet_resized/64x64", "imagenet2012"])
def test_missing_dataset_says_how_to_prepare_it(tmp_path, name):
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(data.DataError) as e:
    tfds_source.TfdsSource(name, "train", data_dir, 64)
  message = str(e.value)
  assert "\n" not in message and "is not prepared in" in message
  assert f"tfds build {name} --data_dir={data_dir} --file_format=array_record" in message
  assert f"--config.data.path={data_dir}" in message
  assert ("downloads/manual" in message) == (name == "imagenet2012")
  assert not os.path.exists(data_dir), "nothing written"


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


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    for key in ("image", "label"):
      np.testing.assert_array_equal(x[key], y[key])


def test_pipeline_on_imagenet2012_is_the_same_with_workers_and_after_a_resume(imagenet2012):
  """2 grain worker processes decode the JPEGs and give exactly the in-process batches,
  from step 0 and from a saved state; one process's batch is 2 processes' halves."""
  data_dir, _ = imagenet2012
  source = tfds_source.TfdsSource("imagenet2012", "train", data_dir, 32)

  def pipeline(**kw):
    return data.make_pipeline(source, 4, seed=1, random_flip=True, **kw)

  with pipeline() as it:
    reference = [next(it) for _ in range(7)]  # 3 steps per epoch: crosses two epochs
  assert reference[0]["image"].shape == (4, 32, 32, 3)
  assert reference[0]["image"].dtype == np.float32 and reference[0]["label"].dtype == np.int32
  with pipeline(num_workers=2) as it:
    first = [next(it) for _ in range(4)]
    state = json.loads(json.dumps(it.get_state()))
  assert state == {"next_step": 4}
  _assert_same_batches(first, reference[:4])
  with pipeline(num_workers=2, start_step=state["next_step"]) as it:
    _assert_same_batches([next(it) for _ in range(3)], reference[4:])
  for step in (0, 5):
    halves = []
    for i in range(2):
      with pipeline(start_step=step, process_index=i, process_count=2) as it:
        halves.append(next(it))
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]),
                                    reference[step][key])


def _reduced_imagenet64(steps: int, data_dir: str):
  config = get_experiment("imagenet64")
  config.data.path = data_dir
  config.data.num_workers = 0
  config.model.ch, config.model.ch_mult = 16, (1, 2)
  config.model.num_res_blocks, config.model.attn_resolutions = 1, (32,)
  config.model.head_channels, config.model.dropout = 16, 0.0
  config.model.dtype = "float32"
  config.train.batch_size, config.train.num_steps = 4, steps
  config.train.checkpoint_every_steps = config.train.log_every_steps = 2
  config.train.warmup_steps = 1
  # Fixed: two runs compared bit for bit must not each time and pick a kernel gradient.
  config.train.kernel_gradient = "taps"
  return config


def test_reduced_imagenet64_trains_and_resumes_on_arrayrecord(imagenet64, tmp_path):
  data_dir = imagenet64[0]
  whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
  final = train.train(_reduced_imagenet64(4, data_dir), whole)
  train.train(_reduced_imagenet64(2, data_dir), split)
  resumed = train.train(_reduced_imagenet64(4, data_dir), split)
  assert int(final.step) == int(resumed.step) == 4
  assert checkpoint.Checkpointer(split).latest_step() == 4
  for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(resumed.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert os.path.exists(os.path.join(split, "config.json"))
