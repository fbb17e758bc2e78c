"""A folder of images with one sub-folder per class, read by index.

Layouts (the two torchvision's ImageFolder users have):

    DIR/CLASS/*.png                     one split, "train"
    DIR/train/CLASS/*.jpg               splits "train" and whichever of
    DIR/val/CLASS/*.jpg                 val/, validation/ or test/ exist
                                        (the same class folders in each)

Classes are the sub-folders in sorted order (label k is the k-th name). Files with an
image extension are examples; anything else (a README, .DS_Store) is ignored. Every image
of a split has one size: stored at the config's size it is read as it is, otherwise with
ADM's centre crop and resize (`data.center_crop_resize`). Opening a split reads each file's
header once, so a mixed size or an unreadable file is refused before anything compiles.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from PIL import Image

from cfgdiff import data

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Sub-folders that make DIR a split layout; held-out splits in the order they are chosen.
TRAIN_SPLIT = "train"
HELD_OUT_SPLITS = ("validation", "val", "test")
_LAYOUT = ("one sub-folder of images per class (DIR/CLASS/*.png), or DIR/train/CLASS/... "
           "beside DIR/val/CLASS/...")


def _subfolders(path: str) -> list[str]:
  return sorted(n for n in os.listdir(path)
                if not n.startswith(".") and os.path.isdir(os.path.join(path, n)))


def splits(path: str) -> dict[str, str]:
  """{split name: folder of its class sub-folders} for the folder at ``path``."""
  if not os.path.isdir(path):
    raise data.DataError(f"config.data.path={path} is not a folder; image_folder needs "
                         f"{_LAYOUT}.")
  names = _subfolders(path)
  if TRAIN_SPLIT in names:
    return {n: os.path.join(path, n) for n in names if n in (TRAIN_SPLIT, *HELD_OUT_SPLITS)}
  return {TRAIN_SPLIT: path}


def held_out_split(path: str) -> str | None:
  """The held-out split's name (validation, val or test, the first present), or None."""
  found = splits(path)
  return next((n for n in HELD_OUT_SPLITS if n in found), None)


def _scan(folder: str) -> tuple[list[str], list[tuple[str, int]]]:
  """(class names, [(path relative to folder, label)]) in a fixed order."""
  classes = _subfolders(folder)
  if not classes:
    raise data.DataError(f"{folder} has no class sub-folders; image_folder needs {_LAYOUT}.")
  files = []
  for label, name in enumerate(classes):
    for root, dirs, names in os.walk(os.path.join(folder, name)):
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      files += [(os.path.relpath(os.path.join(root, n), folder), label) for n in sorted(names)
                if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
  empty = [c for k, c in enumerate(classes) if not any(label == k for _, label in files)]
  if empty:
    raise data.DataError(f"{folder}: class folder(s) {empty[:5]} hold no images "
                         f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder.")
  return classes, files


class ImageFolderSource:
  """One split of an image folder: uint8 [image_size, image_size, channels] images and
  int32 labels by index. Picklable (grain's worker processes read it).

  Args:
    path: config.data.path (either layout, see the module docstring).
    split: "train" or a held-out split `splits(path)` lists.
    image_size, channels: what training reads (channels 1 reads grey, 3 RGB).
  """

  def __init__(self, path: str, split: str, image_size: int, channels: int):
    found = splits(path)
    if split not in found:
      raise data.DataError(f"{path} has no split {split!r}; it has {sorted(found)}. A held-out "
                           f"split is a sub-folder {'/, '.join(HELD_OUT_SPLITS)}/ beside "
                           f"{path}/{TRAIN_SPLIT}/, with the same class folders.")
    self.folder, self.split = found[split], split
    self.image_size, self.channels = image_size, channels
    self.class_names, files = _scan(self.folder)
    self._paths = [p for p, _ in files]
    self._labels = np.asarray([label for _, label in files], np.int32)
    self._stored_size = self._common_size()

  def _common_size(self) -> tuple[int, int]:
    """(width, height) every image of the split has, from the files' headers."""
    first = None
    for relative in self._paths:
      path = os.path.join(self.folder, relative)
      try:
        with Image.open(path) as image:
          size = image.size
      except Exception as e:  # PIL raises several types for a file it cannot read
        raise data.DataError(f"{path} cannot be read as an image ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); delete or "
                             "replace it.") from e
      if first is None:
        first = (relative, size)
      elif size != first[1]:
        raise data.DataError(
            f"{self.folder} holds images of mixed sizes: {first[0]} is "
            f"{first[1][0]}x{first[1][1]}, {relative} is {size[0]}x{size[1]}. Resize them to "
            f"one size (cfgdiff centre-crops and resizes one common size to "
            f"config.data.image_size={self.image_size}).")
    return first[1]

  def __len__(self) -> int:
    return len(self._paths)

  @property
  def labels(self) -> np.ndarray:
    """int32 [N]: every example's label."""
    return self._labels

  def fingerprint(self) -> dict:
    """The example count and a SHA-256 of every file's class, path and size in bytes: an
    added, removed, moved or rewritten-at-another-size image changes it."""
    entries = [(int(label), path, os.path.getsize(os.path.join(self.folder, path)))
               for path, label in zip(self._paths, self._labels, strict=True)]
    digest = hashlib.sha256(json.dumps([self.class_names, entries]).encode())
    return {"examples": len(self), "sha256": digest.hexdigest()}

  def _image(self, index: int) -> np.ndarray:
    path = os.path.join(self.folder, self._paths[index])
    try:
      with Image.open(path) as image:
        array = np.asarray(image.convert("L" if self.channels == 1 else "RGB"))
    except Exception as e:  # damaged after the split was opened
      raise data.DataError(f"{path} cannot be decoded ({type(e).__name__}: {e}); delete or "
                           "replace it.") from e
    if array.ndim == 2:
      array = array[..., None]
    if array.shape[:2] != (self.image_size, self.image_size):
      array = data.center_crop_resize(array, self.image_size, self.channels)
    return array

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, image_size, image_size, channels] and int32 [N] for ``indices`` [N]."""
    images = np.stack([self._image(int(i)) for i in indices])
    return images, self._labels[np.asarray(indices, int)]
