"""IDX reading, the real Fashion-MNIST files, and deterministic per-process batching."""

import gzip
import json
import os
import re

import numpy as np
import pytest

from cfgdiff import data, sources
from tests.conftest import write_idx

DEBIAN_PATH = "/usr/share/datasets/fashion-mnist"


def test_real_fashion_mnist_files():
  """The Debian package is installed by README/CI; a missing one is an install error."""
  images, labels = sources.load_fashion_mnist(DEBIAN_PATH, "train")
  assert images.shape == (60000, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (60000,) and set(np.unique(labels)) == set(range(10))
  test_images, _ = sources.load_fashion_mnist(DEBIAN_PATH, "test")
  assert test_images.shape == (10000, 28, 28, 1)


def test_missing_data_names_path_and_install_command(tmp_path):
  with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist") as e:
    sources.load_fashion_mnist(str(tmp_path), "train")
  assert str(tmp_path) in str(e.value)


def test_corrupt_idx_is_refused(tmp_path):
  path = os.path.join(tmp_path, "bad.gz")
  with gzip.open(path, "wb") as f:
    f.write(b"\x01\x02\x03\x04garbage")
  with pytest.raises(data.DataError, match="not an IDX file"):
    sources.read_idx(path)
  write_idx(path, np.zeros((4, 3, 3), np.uint8))
  with gzip.open(path, "rb") as f:
    raw = f.read()
  with gzip.open(path, "wb") as f:
    f.write(raw[:-5])
  with pytest.raises(data.DataError, match="truncated"):
    sources.read_idx(path)


def test_range_conversion_round_trips():
  x = np.arange(256, dtype=np.uint8)
  y = data.to_model_range(x)
  assert y.min() == -1.0 and y.max() == 1.0
  np.testing.assert_array_equal(data.to_uint8(y), x)


def _batcher(**kw):
  n = 100
  images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
  return data.Batcher(sources.ArraySource(images, np.arange(n, dtype=np.int32)), **dict(
      dict(global_batch_size=10, seed=7), **kw))


def test_batches_are_a_function_of_seed_and_step():
  a, b = _batcher(), _batcher()
  for step in (0, 5, 13, 27):
    np.testing.assert_array_equal(a.batch(step)["label"], b.batch(step)["label"])
  epoch0 = np.concatenate([a.indices(s) for s in range(10)])
  epoch1 = np.concatenate([a.indices(s) for s in range(10, 20)])
  assert sorted(epoch0) == list(range(100)), "each example exactly once per epoch"
  assert not np.array_equal(epoch0, epoch1), "epochs are reshuffled"
  assert not np.array_equal(a.indices(0), _batcher(seed=8).indices(0))


def test_processes_read_disjoint_slices_of_the_global_batch():
  # Labels here are example indices: the processes' batches, in process order, must be
  # the single-process batch in the same order (each position gets its own noise).
  for step in (0, 3, 17):
    whole = _batcher().batch(step)["label"]
    parts = [_batcher(process_index=i, process_count=2).batch(step)["label"] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def _images(n: int = 100) -> sources.ArraySource:
  """Example i: a 2x3 image whose pixel values encode i and the column, so a flip shows."""
  images = np.zeros((n, 2, 3, 1), np.uint8)
  images[:, :, :, 0] = (np.arange(n)[:, None, None] % 50) * 5 + np.arange(3)[None, None, :]
  return sources.ArraySource(images, np.arange(n, dtype=np.int32))


def test_random_flips_are_half_and_mirror_the_example():
  source = _images()
  flips, plain = (data.Batcher(source, 10, seed=4, random_flip=f) for f in (True, False))
  mirrored = []
  for step in range(40):
    a, b = flips.batch(step), plain.batch(step)
    np.testing.assert_array_equal(a["label"], b["label"])
    flipped = np.any(a["image"] != b["image"], axis=(1, 2, 3))
    np.testing.assert_array_equal(flipped, flips.flips(step))
    np.testing.assert_array_equal(a["image"][flipped], b["image"][flipped][:, :, ::-1])
    np.testing.assert_array_equal(a["image"][~flipped], b["image"][~flipped])
    mirrored.append(flipped)
  fraction = np.mean(mirrored)
  assert 0.4 < fraction < 0.6, fraction  # 400 draws: 4 standard deviations either side
  assert not plain.flips(3).any()


def _pipeline(**kw):
  return data.make_pipeline(_images(), **dict(dict(global_batch_size=10, seed=7,
                                                   random_flip=True), **kw))


def test_flips_and_order_are_the_same_under_two_processes_and_after_a_resume():
  with _pipeline() as it:
    whole = [next(it) for _ in range(12)]
  for step in (0, 3, 11):
    parts = []
    for i in range(2):
      with _pipeline(start_step=step, process_index=i, process_count=2) as it:
        parts.append(next(it))
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[step][key])
  with _pipeline() as it:
    for _ in range(5):
      next(it)
    state = it.get_state()
  assert state == {"next_step": 5} and json.loads(json.dumps(state)) == state
  with _pipeline(start_step=state["next_step"]) as it:
    for expected in whole[5:]:
      np.testing.assert_array_equal(next(it)["image"], expected["image"])
    it.set_state({"next_step": 2})
    np.testing.assert_array_equal(next(it)["image"], whole[2]["image"])
    assert it.get_state() == {"next_step": 3}
  assert not np.array_equal(_pipeline(seed=8).__next__()["image"], whole[0]["image"])


def test_worker_processes_give_the_in_process_batches():
  """grain workers (spawned processes), from step 0 and from a saved state: exactly the
  batches of the in-process pipeline, in order."""
  with _pipeline() as it:
    reference = [next(it) for _ in range(14)]  # 10 steps per epoch: crosses an epoch
  with _pipeline(num_workers=2, prefetch=1) as it:
    got = [next(it) for _ in range(6)]
    state = it.get_state()
  assert state == {"next_step": 6}
  with _pipeline(num_workers=2, start_step=state["next_step"]) as it:
    got_resumed = [next(it) for _ in range(8)]
  for batches, start in ((got, 0), (got_resumed, 6)):
    for offset, batch in enumerate(batches):
      assert type(batch["image"]) is np.ndarray  # copied out of grain's shared memory
      for key in ("image", "label"):
        np.testing.assert_array_equal(batch[key], reference[start + offset][key])


class _FailingSource(sources.ArraySource):
  def read(self, indices):
    if 13 in indices:
      raise data.DataError("example 13 is damaged")
    return super().read(indices)


def test_a_worker_error_reaches_the_training_loop():
  source = _images()
  failing = _FailingSource(source.images, source.labels)
  for workers in (0, 1):
    with data.make_pipeline(failing, 10, seed=7, num_workers=workers) as it:
      with pytest.raises(data.DataError, match="example 13 is damaged"):
        for _ in range(10):
          next(it)


def test_pipeline_arguments_are_checked():
  with pytest.raises(data.DataError, match="does not split evenly over 3 processes"):
    _pipeline(process_count=3)
  with pytest.raises(ValueError, match="num_workers=-1"):
    _pipeline(num_workers=-1)


def test_negative_worker_count_is_refused():
  from cfgdiff import configs
  config = configs.default_config()
  configs.validate(config, num_devices=1)
  config.data.num_workers = -1
  with pytest.raises(configs.ConfigError, match=re.escape(
      "config.data.num_workers=-1 is invalid: must be an integer >= 0")):
    configs.validate(config, num_devices=1)
