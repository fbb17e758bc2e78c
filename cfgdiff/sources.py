"""Where examples come from: one source per split of the dataset config.data names.

- `fashion_mnist`: Debian's IDX files, held in memory (`ArraySource`).
- `image_folder`: one sub-folder of images per class under config.data.path
  (`cfgdiff.image_folder`).
- any other name: that TFDS dataset, prepared as ArrayRecord in config.data.path
  (`cfgdiff.tfds_source`).

A source has ``len``, ``read(indices) -> (uint8 [N, H, W, C], int32 [N])`` and
``fingerprint()``. `open_split` opens the training or held-out split a config names and
checks it against the config's shapes: everything wrong is one DataError line, raised
before anything compiles. `training_pipeline` is the training split's batches as the
training loop reads them.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import struct

import jax
import ml_collections
import numpy as np

from cfgdiff import data
from cfgdiff.data import DataError

IMAGE_FOLDER = "image_folder"
FASHION_MNIST = "fashion_mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")



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


@dataclasses.dataclass
class ArraySource:
  """Examples held in memory: images uint8 [N, H, W, C] and labels int32 [N]."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.images)

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]

  def fingerprint(self) -> dict:
    """The example count and a SHA-256 of every label and pixel (a resumed run checks it)."""
    digest = hashlib.sha256(np.ascontiguousarray(self.labels).tobytes())
    digest.update(np.ascontiguousarray(self.images).tobytes())
    return {"examples": len(self), "sha256": digest.hexdigest()}



@dataclasses.dataclass(frozen=True)
class Split:
  """An opened split: its source, its name in the dataset (for results) and a key that
  names the data in cache files."""
  source: object  # ArraySource | tfds_source.TfdsSource | image_folder.ImageFolderSource
  name: str
  cache_key: str


def split_name(dc: ml_collections.ConfigDict, role: str) -> str:
  """The dataset's own name of the ``role`` ("train" or "held_out") split: config.data's
  train_split / eval_split, or for an empty eval_split the first held-out split the data
  has (Fashion-MNIST's test; a TFDS dataset's validation, else test; an image folder's
  validation, val or test sub-folder)."""
  if role == "train":
    return dc.train_split
  if dc.eval_split:
    return dc.eval_split
  if dc.name == FASHION_MNIST:
    found = "test"
  elif dc.name == IMAGE_FOLDER:
    from cfgdiff import image_folder  # pylint: disable=g-import-not-at-top
    found = image_folder.held_out_split(dc.path)
  else:
    from cfgdiff import tfds_source  # pylint: disable=g-import-not-at-top
    found = tfds_source.held_out_split(dc.name, dc.path)
  if found is None:
    raise DataError(f"{dc.name} in {dc.path} has no held-out split (validation, val or test) "
                    "for evaluation's floor; add one or name one with --config.data.eval_split.")
  return found


_OPENED: dict[tuple, Split] = {}


def open_split(dc: ml_collections.ConfigDict, role: str) -> Split:
  """The ``role`` ("train" or "held_out") split of the data ``dc`` (config.data) names,
  checked against its image_size, channels and num_classes. Opened once per process."""
  name = split_name(dc, role)
  key = (dc.name, dc.path, name, dc.image_size, dc.channels, dc.num_classes)
  if key not in _OPENED:
    _OPENED[key] = _open(dc, name)
  return _OPENED[key]


def _open(dc: ml_collections.ConfigDict, split: str) -> Split:
  expected = (dc.image_size, dc.image_size, dc.channels)
  if dc.name == FASHION_MNIST:
    if split not in FASHION_MNIST_FILES:
      raise DataError(f"Fashion-MNIST has no split {split!r}; its splits are "
                      f"{sorted(FASHION_MNIST_FILES)}.")
    images, labels = load_fashion_mnist(dc.path, split)
    if images.shape[1:] != expected:
      raise DataError(f"{dc.path} holds images of shape {images.shape[1:]}, but "
                      f"config.data.image_size/channels ask for {expected}.")
    _check_labels(labels, dc, dc.path)
    return Split(ArraySource(images, labels), split, FASHION_MNIST)
  if dc.name == IMAGE_FOLDER:
    from cfgdiff import image_folder  # pylint: disable=g-import-not-at-top
    source = image_folder.ImageFolderSource(dc.path, split, dc.image_size, dc.channels)
    if len(source.class_names) != dc.num_classes:
      shown = source.class_names[:8] + (["..."] if len(source.class_names) > 8 else [])
      raise DataError(f"{source.folder} has {len(source.class_names)} class folders "
                      f"({', '.join(shown)}), but config.data.num_classes={dc.num_classes}; "
                      f"pass --config.data.num_classes={len(source.class_names)}.")
    return Split(source, split, f"{IMAGE_FOLDER}-{source.fingerprint()['sha256'][:12]}")
  from cfgdiff import tfds_source  # pylint: disable=g-import-not-at-top
  source = tfds_source.TfdsSource(dc.name, split, dc.path, dc.image_size)
  if source.channels != dc.channels:
    raise DataError(f"TFDS dataset {dc.name} stores {source.channels}-channel images, but "
                    f"config.data.channels={dc.channels}; pass "
                    f"--config.data.channels={source.channels}.")
  if len(source.class_names) != dc.num_classes:
    raise DataError(f"TFDS dataset {dc.name} has {len(source.class_names)} classes, but "
                    f"config.data.num_classes={dc.num_classes}; pass "
                    f"--config.data.num_classes={len(source.class_names)}.")
  return Split(source, split, dc.name)


def _check_labels(labels: np.ndarray, dc: ml_collections.ConfigDict, where: str) -> None:
  if labels.max() >= dc.num_classes:
    raise DataError(f"{where} has label {labels.max()}, outside "
                    f"[0, config.data.num_classes={dc.num_classes}).")


def training_source(config: ml_collections.ConfigDict) -> data.Source:
  """The training examples config.data names, checked against the config's shapes."""
  return open_split(config.data, "train").source


def training_batcher(config: ml_collections.ConfigDict) -> data.Batcher:
  """This process's batches of the training split, by step (see `data.Batcher`)."""
  return data.Batcher(training_source(config), config.train.batch_size, config.seed,
                      jax.process_index(), jax.process_count(),
                      random_flip=config.data.random_flip,
                      random_crop=config.data.random_crop)


def training_pipeline(config: ml_collections.ConfigDict, start_step: int) -> data.Pipeline:
  """This process's batches from ``start_step`` on, made ahead by config.data.num_workers
  worker processes (the same batches for any number of workers or processes)."""
  return data.Pipeline(training_batcher(config), start_step, config.data.num_workers)
