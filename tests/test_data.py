"""IDX reading, the real Fashion-MNIST files, and deterministic per-process batching."""

import gzip
import os

import numpy as np
import pytest

from cfgdiff import data
from tests.conftest import write_idx

DEBIAN_PATH = "/usr/share/datasets/fashion-mnist"


def test_real_fashion_mnist_files():
  """The Debian package is installed by README/CI; a missing one is an install error."""
  images, labels = data.load_fashion_mnist(DEBIAN_PATH, "train")
  assert images.shape == (60000, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (60000,) and set(np.unique(labels)) == set(range(10))
  test_images, _ = data.load_fashion_mnist(DEBIAN_PATH, "test")
  assert test_images.shape == (10000, 28, 28, 1)


def test_missing_data_names_path_and_install_command(tmp_path):
  with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist") as e:
    data.load_fashion_mnist(str(tmp_path), "train")
  assert str(tmp_path) in str(e.value)


def test_corrupt_idx_is_refused(tmp_path):
  path = os.path.join(tmp_path, "bad.gz")
  with gzip.open(path, "wb") as f:
    f.write(b"\x01\x02\x03\x04garbage")
  with pytest.raises(data.DataError, match="not an IDX file"):
    data.read_idx(path)
  write_idx(path, np.zeros((4, 3, 3), np.uint8))
  with gzip.open(path, "rb") as f:
    raw = f.read()
  with gzip.open(path, "wb") as f:
    f.write(raw[:-5])
  with pytest.raises(data.DataError, match="truncated"):
    data.read_idx(path)


def test_range_conversion_round_trips():
  x = np.arange(256, dtype=np.uint8)
  y = data.to_model_range(x)
  assert y.min() == -1.0 and y.max() == 1.0
  np.testing.assert_array_equal(data.to_uint8(y), x)


def _batcher(**kw):
  n = 100
  images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
  return data.Batcher(data.ArraySource(images, np.arange(n, dtype=np.int32)), **dict(
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
