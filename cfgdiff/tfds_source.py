"""A TFDS dataset read by index through `tfds.data_source` (ArrayRecord files; no
TensorFlow in the input path), with a one-line error for anything it cannot open: an
unknown name (with the close registered ones), a dataset not prepared or built as
TFRECORD, a missing split (with the splits it has).
"""

from __future__ import annotations

import difflib
import hashlib
import json

import numpy as np

from cfgdiff import data
from cfgdiff.data import DataError

# Held-out splits in the order evaluation chooses them when config.data.eval_split is "".
HELD_OUT_SPLITS = ("validation", "test")
# How README tells users to prepare a dataset as ArrayRecord (what tfds.data_source reads).
# `tfds build NAME --data_dir=DIR --file_format=array_record` does the same, but the `tfds`
# command of tensorflow-datasets 4.9.10 does not start without apache-beam installed.
TFDS_PREPARE = ("python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
                "data_dir='{data_dir}', file_format='array_record').download_and_prepare()\"")
TFDS_BUILD = "tfds build {name} --data_dir={data_dir} --file_format=array_record"
TFDS_CONVERT = ("tfds convert_format --dataset_version_dir={path} "
                "--out_file_format=array_record")


def tfds_help(name: str, data_dir: str) -> str:
  """How to prepare TFDS dataset ``name`` in ``data_dir`` as ArrayRecord, in one line."""
  data_dir = data_dir or "DIR"
  manual = (f"; ImageNet 2012 needs ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
            f"{data_dir}/downloads/manual first" if name == "imagenet2012" else "")
  prepare = TFDS_PREPARE.format(name=name, data_dir=data_dir)
  build = TFDS_BUILD.format(name=name, data_dir=data_dir)
  return (f"Prepare it once as ArrayRecord with `{prepare}` (the same as `{build}`, a command "
          f"that needs apache-beam installed){manual}; then pass --config.data.path={data_dir}.")


def _first_line(e: Exception) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"




def _unknown_name_help(name: str) -> str:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  close = difflib.get_close_matches(name.split("/")[0], tfds.list_builders(), n=3)
  return (f"TFDS has no dataset {name!r}" + (f"; close names: {close}" if close else "")
          + ". Pass --config.data.name=fashion_mnist, image_folder (with "
          "--config.data.path=DIR) or a name from https://www.tensorflow.org/datasets/catalog.")


def held_out_split(name: str, data_dir: str) -> str | None:
  """The first of HELD_OUT_SPLITS that TFDS dataset ``name`` has, or None. (An unprepared
  dataset lists no splits: "validation", whose opening then says how to prepare it.)"""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(_unknown_name_help(name)) from e
  except Exception:  # pylint: disable=broad-except
    return HELD_OUT_SPLITS[0]  # opening it gives the one-line error
  if not builder.is_prepared():
    return HELD_OUT_SPLITS[0]
  return next((s for s in HELD_OUT_SPLITS if s in builder.info.splits), None)


def open_tfds(name: str, split: str, data_dir: str):
  """``tfds.data_source(name, split, data_dir)``, or a one-line DataError saying what is
  wrong: no dataset there, a dataset built as TFRECORD (which data_source cannot read), or
  no such split. Reads only metadata before that, and writes nothing.

  Returns:
    a random-access sequence of examples (dicts of numpy values).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = data_dir or "the TFDS default data_dir (~/tensorflow_datasets)"
  help_text = tfds_help(name, data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
    prepared = builder.is_prepared()
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(_unknown_name_help(name)) from e
  except Exception as e:  # TFDS raises several types for a name or folder it cannot use
    raise DataError(f"TFDS dataset {name} cannot be opened in {where} ({_first_line(e)}). "
                    + help_text) from e
  if not prepared:
    raise DataError(f"TFDS dataset {name} is not prepared in {where} (no "
                    f"{builder.data_dir}/dataset_info.json). " + help_text)
  formats = {f.value for f in builder.info.available_file_formats()}
  if not formats:  # builds older than TFDS's file_format field were all TFRECORD
    formats = {f for f in ("tfrecord", "array_record")
               if any(builder.data_path.glob(f"*.{f}-*"))} or {"unknown"}
  if "array_record" not in formats:
    raise DataError(
        f"TFDS dataset {name} in {builder.data_dir} was built as "
        f"{'/'.join(sorted(formats)).upper()} files, but cfgdiff reads examples by index "
        "through tfds.data_source, which needs ArrayRecord. Rebuild it with `"
        + TFDS_PREPARE.format(name=name, data_dir=data_dir or "DIR") + "` (or `"
        + TFDS_BUILD.format(name=name, data_dir=data_dir or "DIR") + "`) after moving "
        f"{builder.data_dir} away, or convert it in place with `"
        + TFDS_CONVERT.format(path=builder.data_dir) + "` (both commands of the `tfds` tool "
        "need apache-beam installed).")
  splits = sorted(builder.info.splits)
  if split.split("[")[0] not in splits:
    raise DataError(f"TFDS dataset {name} in {builder.data_dir} has no split {split!r}; "
                    f"its splits are {splits}.")
  try:
    return builder.as_data_source(split=split, file_format="array_record")
  except Exception as e:  # a damaged or partly copied dataset folder
    raise DataError(f"TFDS dataset {name} (split {split}) in {builder.data_dir} cannot be "
                    f"read ({_first_line(e)}). " + help_text) from e


class TfdsSource:
  """A TFDS dataset read by index through `tfds.data_source` (ArrayRecord files; no
  TensorFlow in the input path). Images come out uint8 [image_size, image_size, C]:
  stored at that size as they are (imagenet_resized), otherwise with ADM's centre crop.

  Any dataset with an "image" and a "label" (ClassLabel) feature; ``channels`` and
  ``class_names`` are the stored ones. Picklable (TFDS's data sources are), so grain's
  worker processes can read it.
  """

  def __init__(self, name: str, split: str, data_dir: str, image_size: int):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._source = open_tfds(name, split, data_dir)
    self.image_size = image_size
    self._name, self._split, self._data_dir = name, split, data_dir
    features = tfds.builder(name, data_dir=data_dir or None).info.features
    label = features["label"] if "label" in features else None
    if "image" not in features or not isinstance(label, tfds.features.ClassLabel):
      raise DataError(f"TFDS dataset {name} has features {sorted(features)}; cfgdiff trains "
                      "on an 'image' with a class 'label' (ClassLabel). Use a dataset that has "
                      "them, or export the images to folders for --config.data.name=image_folder.")
    self.channels = int(features["image"].shape[-1] or 3)
    self.class_names = list(label.names)

  def fingerprint(self) -> dict:
    """The example count and a SHA-256 of the split's metadata (version, shard files and
    their lengths and sizes): a rebuilt or different dataset changes it."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds.builder(self._name, data_dir=self._data_dir or None)
    info = builder.info.splits[self._split]
    metadata = {"name": self._name, "version": str(builder.version), "split": self._split,
                "shard_lengths": [int(n) for n in info.shard_lengths],
                "num_bytes": int(info.num_bytes),
                "files": sorted(str(f).rsplit("/", 1)[-1] for f in info.filenames)}
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    return {"examples": len(self), "sha256": digest.hexdigest()}

  def __len__(self) -> int:
    return len(self._source)

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, image_size, image_size, channels] and int32 [N] for ``indices`` [N]."""
    # One batched read: ArrayRecord fetches the records of different files in parallel.
    examples = self._source.__getitems__([int(i) for i in indices])
    images, labels = [], []
    for example in examples:
      image = np.asarray(example["image"])
      if image.shape[:2] != (self.image_size, self.image_size):
        image = data.center_crop_resize(image, self.image_size, self.channels)
      images.append(image)
      labels.append(int(example["label"]))
    return np.stack(images), np.asarray(labels, np.int32)


