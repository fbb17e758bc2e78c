"""Input pipelines. Batches are a pure function of (seed, step), so the data position
is just the step: resuming at step s yields exactly the batches an uninterrupted run sees.

Each process reads only its own slice of every global batch (multi-host).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct

import numpy as np

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")


class DataError(RuntimeError):
  """Missing or malformed input data; the message says how to fix it."""


def read_idx(path: str) -> np.ndarray:
  """Reads a (optionally gzipped) IDX file of unsigned bytes into a uint8 array."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number).")
  ndim = data[3]
  shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise DataError(f"{path} is truncated: header says {shape}, found {array.size} bytes.")
  return array.reshape(shape)


def load_fashion_mnist(path: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """Loads Fashion-MNIST from Debian's IDX files.

  Returns:
    images uint8 [N, 28, 28, 1] and labels int32 [N].
  """
  image_file, label_file = (os.path.join(path, name) for name in FASHION_MNIST_FILES[split])
  for file in (image_file, label_file):
    if not os.path.exists(file):
      raise DataError(f"Fashion-MNIST file {file} not found. Install the data with "
                      f"`{FASHION_MNIST_INSTALL}` or set --config.data.path to the folder "
                      "holding the IDX files.")
  images, labels = read_idx(image_file), read_idx(label_file)
  if images.shape[0] != labels.shape[0]:
    raise DataError(f"{image_file} and {label_file} hold different numbers of examples.")
  return images[..., None], labels.astype(np.int32)


def to_model_range(images_uint8: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images_uint8.astype(np.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255] (clipped, rounded)."""
  return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


@dataclasses.dataclass
class ArrayBatcher:
  """Deterministic shuffled batches from in-memory arrays, indexed by step.

  Epoch e uses permutation ``default_rng([seed, e])`` of the examples; each epoch has
  ``len // global_batch_size`` steps (the remainder is dropped). ``batch(step)``
  returns this process's contiguous slice of the global batch.
  """

  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray  # int32 [N]
  global_batch_size: int
  seed: int
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    self.steps_per_epoch = len(self.images) // self.global_batch_size
    if self.steps_per_epoch == 0:
      raise DataError(f"batch size {self.global_batch_size} exceeds the {len(self.images)} "
                      "training examples.")
    self._epoch, self._order = -1, None

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._epoch:
      self._epoch = epoch
      self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.images))
    return self._order

  def indices(self, step: int) -> np.ndarray:
    """Indices of this process's part of the global batch at ``step``.

    The global batch is sorted (sorted reads are faster) before it is split, so every
    example keeps its global position, and with it its noise, at any process count.
    """
    epoch, position = divmod(step, self.steps_per_epoch)
    start = position * self.global_batch_size
    global_indices = np.sort(self._permutation(epoch)[start:start + self.global_batch_size])
    local = self.global_batch_size // self.process_count
    return global_indices[self.process_index * local:(self.process_index + 1) * local]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """{'image': float32 [B_local,H,W,C] in [-1, 1], 'label': int32 [B_local]}."""
    idx = self.indices(step)
    return {"image": to_model_range(self.images[idx]), "label": self.labels[idx]}
