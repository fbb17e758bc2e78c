"""Small but real TFDS datasets, built on this machine by TFDS itself, in seconds.

- `build_imagenet2012`: the real `imagenet2012` builder, run as README tells a user to,
  from a manual-download folder holding generated JPEG tars in ImageNet's
  layout (ILSVRC2012_img_train.tar of one tar per synset, ILSVRC2012_img_val.tar).
- `build_imagenet_resized64`: the real `imagenet_resized/64x64` builder downloads zips whose
  checksums no local file can match, so a subclass that generates from local arrays writes
  the same dataset (name, config, version, features, splits) where the real one would.
  Reading goes through the real, registered builder, as in training.

Both write ArrayRecord files by default (what `tfds.data_source` reads) and TFRECORD on
request (to test the error for it). Used by tests/test_tfds.py, tests/test_data.py,
benchmarks/input_throughput.py and the pod rehearsal.
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image

# (width, height) cycled over the JPEGs: landscape, portrait, ImageNet's common 500 x 375
# and 500 x 333, one square, and one whose short side (200) is below 2 x 128, so some
# images are box-halved before the bicubic resize and some are not.
JPEG_SIZES = ((500, 375), (375, 500), (500, 333), (640, 480), (256, 256), (300, 200))
# A bright colour per class: the centre square of each JPEG (what ADM's crop keeps).
PALETTE = np.array([(230, 40, 40), (40, 200, 60), (50, 80, 230), (230, 200, 40),
                    (200, 60, 220), (40, 210, 220), (240, 240, 240), (250, 130, 40)], np.uint8)
RESIZED64_VERSION = "0.1.0"


def imagenet_synsets(count: int) -> list[str]:
  """The first ``count`` synsets of TFDS's imagenet2012 label list (label ids 0..count-1)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  path = tfds.core.tfds_path("datasets/imagenet2012/labels.txt")
  return path.read_text().split()[:count]


def centre_square_image(width: int, height: int, colour: np.ndarray, rng: np.random.Generator,
                        texture: float = 0.0) -> np.ndarray:
  """uint8 [height, width, 3]: ``colour`` in the centred square of side min(width, height),
  dark grey outside it, plus Gaussian noise of std ``texture`` (0-255 units; real photos
  compress to about 110 KB at 500 x 375, which texture ~ 12 imitates)."""
  image = np.full((height, width, 3), 20, np.float32)
  side = min(width, height)
  top, left = (height - side) // 2, (width - side) // 2
  image[top:top + side, left:left + side] = colour
  if texture:
    image += rng.normal(0.0, texture, image.shape)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
  out = io.BytesIO()
  Image.fromarray(image).save(out, format="JPEG", quality=quality)
  return out.getvalue()


def _add_file(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def write_imagenet2012_manual(manual_dir: str, num_classes: int = 3, per_class: int = 4,
                              num_val: int = 4, texture: float = 0.0, seed: int = 0,
                              sizes: tuple[tuple[int, int], ...] = JPEG_SIZES
                              ) -> dict[str, tuple[int, bytes]]:
  """Writes ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in ImageNet's layout.

  The train tar holds one tar per synset (n01440764.tar of n01440764_{i}.JPEG); the
  validation tar holds ILSVRC2012_val_{i:08d}.JPEG, whose labels TFDS takes from its own
  validation_labels.txt (the real ones of the first ``num_val`` images). Image i of a
  class has (width, height) sizes[i % len(sizes)] and the class's PALETTE colour in its
  centre square.

  Returns:
    {file name: (class index in PALETTE, JPEG bytes)} for every train image.
  """
  os.makedirs(manual_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  written = {}
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as train:
    for k, synset in enumerate(imagenet_synsets(num_classes)):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as class_tar:
        for i in range(per_class):
          width, height = sizes[i % len(sizes)]
          payload = jpeg_bytes(centre_square_image(
              width, height, PALETTE[k % len(PALETTE)], rng, texture))
          name = f"{synset}_{i + 1}.JPEG"
          _add_file(class_tar, name, payload)
          written[name] = (k, payload)
      _add_file(train, f"{synset}.tar", inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as val:
    for i in range(num_val):
      width, height = sizes[(i + 1) % len(sizes)]
      image = centre_square_image(width, height, PALETTE[i % len(PALETTE)], rng, texture)
      _add_file(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg_bytes(image))
  return written


def build_imagenet2012(data_dir: str, num_classes: int = 3, per_class: int = 4, num_val: int = 4,
                       texture: float = 0.0, file_format: str = "array_record", seed: int = 0,
                       sizes: tuple[tuple[int, int], ...] = JPEG_SIZES
                       ) -> dict[str, tuple[int, bytes]]:
  """Builds `imagenet2012` in ``data_dir`` with TFDS's real builder, as README tells a user:

      python -c "import tensorflow_datasets as tfds; tfds.builder('imagenet2012',
          data_dir=DIR, file_format='array_record').download_and_prepare()"

  from the tars that `write_imagenet2012_manual` puts in DIR/downloads/manual (TFDS's
  default manual_dir). (`tfds build ... --file_format=array_record` does the same, but the
  `tfds` command of tensorflow-datasets 4.9.10 does not start without apache-beam.)

  Returns:
    what `write_imagenet2012_manual` returns.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  written = write_imagenet2012_manual(os.path.join(data_dir, "downloads", "manual"),
                                      num_classes, per_class, num_val, texture, seed, sizes)
  tfds.builder("imagenet2012", data_dir=data_dir,
               file_format=file_format).download_and_prepare()
  return written


def resized64_arrays(num_examples: int, num_classes: int = 8,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """images uint8 [N, 64, 64, 3] and labels int32 [N] for `build_imagenet_resized64`.

  Image i is its class's PALETTE colour with noise, and carries its own index in pixel
  (0, 0): red = i % 256, green = i // 256, so a test can tell which example it read.
  """
  rng = np.random.default_rng(seed)
  labels = (np.arange(num_examples) % num_classes).astype(np.int32)
  images = PALETTE[labels % len(PALETTE)][:, None, None, :].astype(np.float32)
  images = images + rng.normal(0.0, 20.0, (num_examples, 64, 64, 3))
  images = np.clip(np.round(images), 0, 255).astype(np.uint8)
  images[:, 0, 0, 0] = np.arange(num_examples) % 256
  images[:, 0, 0, 1] = np.arange(num_examples) // 256
  return images, labels


def _resized64_builder_class():
  """A subclass of TFDS's own imagenet_resized builder that generates from local arrays.

  It keeps the real builder's name, configs, version and features (`_info` is inherited),
  and is not registered, so `tfds.builder('imagenet_resized/64x64')` stays the real one.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.datasets.imagenet_resized import (  # pylint: disable=g-import-not-at-top
    imagenet_resized_dataset_builder as real,
  )

  class LocalImagenetResized(real.Builder, skip_registration=True):
    """imagenet_resized from in-memory arrays (set ``arrays`` before building)."""

    name = "imagenet_resized"
    # TFDS looks for a checksums.tsv beside a builder's code; nothing is downloaded here.
    code_path = None
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _split_generators(self, dl_manager):
      del dl_manager
      return [tfds.core.SplitGenerator(name=split, gen_kwargs={"split": split})
              for split in self.arrays]

    def _generate_examples(self, split):
      images, labels = self.arrays[split]
      for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        yield f"{split}_{i}", {"image": image, "label": int(label)}

  return LocalImagenetResized


def build_imagenet_resized64(data_dir: str, num_train: int = 64, num_val: int = 16,
                             num_classes: int = 8, file_format: str = "array_record",
                             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Builds `imagenet_resized/64x64` (version 0.1.0, the real one's) in ``data_dir`` with
  TFDS's own writer, from `resized64_arrays` (train) and a disjoint set (validation).

  Returns:
    the train images uint8 [num_train, 64, 64, 3] and labels int32 [num_train].
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  train = resized64_arrays(num_train, num_classes, seed)
  val = resized64_arrays(num_val, num_classes, seed + 1)
  builder_class = _resized64_builder_class()
  builder_class.arrays = {"train": train, "validation": val}
  builder = builder_class(config="64x64", data_dir=data_dir, file_format=file_format)
  assert str(builder.version) == RESIZED64_VERSION, builder.version
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return train
