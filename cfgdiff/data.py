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
from PIL import Image

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
class ArraySource:
  """Examples held in memory: images uint8 [N, H, W, C] and labels int32 [N]."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.images)

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]


TFDS_DATASETS = ("imagenet_resized/64x64", "imagenet2012")
TFDS_HELP = ("Prepare it once with `tfds build {name} --data_dir=DIR` (ImageNet 2012 needs "
             "its tar files in DIR/downloads/manual first) and pass "
             "--config.data.path=DIR.")


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """ADM's ImageNet preprocessing: halve with a box filter while the short side is at
  least 2 * size, resize the short side to ``size`` (bicubic), crop the centre square.

  image: uint8 [H, W, C] -> uint8 [size, size, 3].
  """
  pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
  while min(pil.size) >= 2 * size:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
  scale = size / min(pil.size)
  pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
  array = np.asarray(pil.convert("RGB"))
  top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
  return array[top:top + size, left:left + size]


class TfdsSource:
  """A TFDS dataset read by index through `tfds.data_source` (ArrayRecord files; no
  TensorFlow in the input path). Images come out uint8 [image_size, image_size, 3]."""

  def __init__(self, name: str, split: str, data_dir: str, image_size: int):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                      download=False)
    except Exception as e:  # TFDS raises several types for a dataset that is not there
      raise DataError(f"TFDS dataset {name} (split {split}) cannot be read from "
                      f"{data_dir or 'the TFDS default data_dir'}: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}. "
                      + TFDS_HELP.format(name=name)) from e
    self.image_size = image_size

  def __len__(self) -> int:
    return len(self._source)

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for i in indices:
      example = self._source[int(i)]
      image = np.asarray(example["image"])
      if image.shape[:2] != (self.image_size, self.image_size):
        image = center_crop_resize(image, self.image_size)
      images.append(image)
      labels.append(int(example["label"]))
    return np.stack(images), np.asarray(labels, np.int32)


@dataclasses.dataclass
class Batcher:
  """Deterministic shuffled batches from an indexable source, a function of the step.

  Epoch e uses permutation ``default_rng([seed, e])`` of the examples; each epoch has
  ``len // global_batch_size`` steps (the remainder is dropped). ``batch(step)``
  returns this process's contiguous slice of the global batch, so the data position
  saved with a checkpoint is just the step.
  """

  source: ArraySource | TfdsSource
  global_batch_size: int
  seed: int
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    self.steps_per_epoch = len(self.source) // self.global_batch_size
    if self.steps_per_epoch == 0:
      raise DataError(f"batch size {self.global_batch_size} exceeds the {len(self.source)} "
                      "training examples.")
    self._epoch, self._order = -1, None

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._epoch:
      self._epoch = epoch
      self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
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
    images, labels = self.source.read(self.indices(step))
    return {"image": to_model_range(images), "label": labels}
