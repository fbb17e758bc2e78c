"""ImageNet 64x64 (TFDS `imagenet_resized/64x64`) prepared as ArrayRecord, three ways.

    python -m cfgdiff.prepare_imagenet64 --data_dir=DIR                    # TFDS downloads
    python -m cfgdiff.prepare_imagenet64 --data_dir=DIR --zips=FOLDER      # zips by hand
    python -m cfgdiff.prepare_imagenet64 --data_dir=DIR --imagenet2012=FOLDER

TFDS's builder downloads three zips from image-net.org, which now serves them only to
signed-in accounts: its download fails, and this says so in one line naming the other
two ways. With ``--zips``, FOLDER holds those zips downloaded by hand (ZIPS below, from
image-net.org's download page, "Downsampled ImageNet 64x64"); each is checked against the
SHA-256 TFDS records for it. With ``--imagenet2012``, FOLDER holds ILSVRC2012_img_train.tar
and ILSVRC2012_img_val.tar, and every image is made the way the zips were: the whole image
resized to 64x64 with PIL's box filter, aspect ratio not kept, greyscale and CMYK converted
to RGB (Chrabaszcz, Loshchilov & Hutter 2017, "A Downsampled Variant of ImageNet", sec. 2;
their image_resizer_imagent.py). Labels follow the zips' class order (TFDS's
imagenet_resized_labels.txt).

Each way writes the dataset TFDS's own builder writes (name, config, version, features,
splits), read by training with --config.data.path=DIR.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import tarfile
import zipfile
from collections.abc import Iterator

import numpy as np
from absl import app, flags
from PIL import Image

from cfgdiff import files
from cfgdiff.data import DataError

NAME = "imagenet_resized/64x64"
SIZE = 64
ZIPS = {"train": ("Imagenet64_train_part1_npz.zip", "Imagenet64_train_part2_npz.zip"),
        "validation": ("Imagenet64_val_npz.zip",)}
TARS = {"train": "ILSVRC2012_img_train.tar", "validation": "ILSVRC2012_img_val.tar"}
DOWNLOAD_PAGE = "https://image-net.org/download-images.php"


def recorded_sha256() -> dict[str, str]:
  """{zip file name: SHA-256} as TFDS records them (its checksums.tsv)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  lines = tfds.core.tfds_path("datasets/imagenet_resized/checksums.tsv").read_text().splitlines()
  return {fields[3]: fields[2] for fields in (line.split("\t") for line in lines)
          if len(fields) == 4}


def check_zips(folder: str, verify: bool = True) -> dict[str, list[str]]:
  """{split: [zip paths]}, every zip present and (with ``verify``) of TFDS's SHA-256."""
  paths = {split: [os.path.join(folder, n) for n in names] for split, names in ZIPS.items()}
  missing = [p for ps in paths.values() for p in ps if not os.path.isfile(p)]
  if missing:
    raise DataError(f"{', '.join(missing)} not found: download the ImageNet 64x64 zips "
                    f"({', '.join(n for ns in ZIPS.values() for n in ns)}) from {DOWNLOAD_PAGE} "
                    f"(signed in) into {folder}, or build from ImageNet 2012 with "
                    "--imagenet2012=FOLDER.")
  if verify:
    expected = recorded_sha256()
    for path in (p for ps in paths.values() for p in ps):
      digest = files.sha256_file(path)
      if digest != expected[os.path.basename(path)]:
        raise DataError(f"{path} has SHA-256 {digest}, not the {expected[os.path.basename(path)]} "
                        "TFDS records for it: a partial or different download. Download it "
                        "again (--noverify skips this check, for a trusted repack).")
  return paths


def zip_examples(paths: list[str]) -> Iterator[tuple[np.ndarray, int]]:
  """(uint8 [64, 64, 3], label 0..999) of every example in the zips' .npz batches, in
  order. The batches store images flat as CHW and labels from 1."""
  for path in paths:
    with zipfile.ZipFile(path) as archive:
      for name in sorted(n for n in archive.namelist() if n.endswith(".npz")):
        with archive.open(name) as f:
          batch = np.load(io.BytesIO(f.read()), allow_pickle=False)
        for flat, label in zip(batch["data"], batch["labels"], strict=True):
          yield flat.reshape(3, SIZE, SIZE).transpose(1, 2, 0), int(label) - 1


def downsample(jpeg: bytes) -> np.ndarray:
  """uint8 [64, 64, 3]: the whole image box-resized, as the zips were made."""
  with Image.open(io.BytesIO(jpeg)) as image:
    return np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BOX))


def _tar_files(path: str) -> Iterator[tuple[str, bytes]]:
  """(member name, bytes) of every file in a tar, and in the tars it holds (ImageNet's
  train tar is one tar per synset)."""
  with tarfile.open(path) as outer:
    for member in outer:
      if not member.isfile():
        continue
      payload = outer.extractfile(member).read()
      if member.name.endswith(".tar"):
        with tarfile.open(fileobj=io.BytesIO(payload)) as inner:
          for m in inner:
            if m.isfile():
              yield m.name, inner.extractfile(m).read()
      else:
        yield member.name, payload


def tar_examples(path: str, split: str, workers: int) -> Iterator[tuple[np.ndarray, int]]:
  """(uint8 [64, 64, 3], label) of every image of an ImageNet 2012 tar, downsampled in
  ``workers`` processes, in the tar's order."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  classes = tfds.core.tfds_path("image_classification/imagenet_resized_labels.txt")
  index = {synset: k for k, synset in enumerate(classes.read_text().split())}
  if split == "validation":
    val = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt").read_text().split()

  def label(name: str) -> int:
    base = os.path.basename(name)
    if split == "train":
      return index[base.split("_")[0]]
    return index[val[int(base.split("_")[-1].split(".")[0]) - 1]]  # ILSVRC2012_val_N.JPEG

  files = _tar_files(path)
  with concurrent.futures.ProcessPoolExecutor(workers) as pool:
    while chunk := [f for _, f in zip(range(256 * workers), files, strict=False)]:
      for (name, _), image in zip(chunk, pool.map(downsample, [p for _, p in chunk],
                                                  chunksize=64), strict=True):
        yield image, label(name)


def _builder_class():
  """TFDS's imagenet_resized builder, generating from local files instead of downloading:
  its name, configs, version and features are inherited, and it is not registered."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.datasets.imagenet_resized import (  # pylint: disable=g-import-not-at-top
    imagenet_resized_dataset_builder as real,
  )

  class LocalImagenetResized(real.Builder, skip_registration=True):
    name = "imagenet_resized"
    code_path = None  # no checksums.tsv lookup: nothing is downloaded
    examples: dict = {}  # split -> a function returning that split's examples

    def _split_generators(self, dl_manager):
      del dl_manager
      return [tfds.core.SplitGenerator(name=split, gen_kwargs={"split": split})
              for split in self.examples]

    def _generate_examples(self, split):
      for i, (image, label) in enumerate(self.examples[split]()):
        yield f"{split}_{i}", {"image": image, "label": label}

  return LocalImagenetResized


def prepare(data_dir: str, zips: str = "", imagenet2012: str = "", verify: bool = True,
            workers: int | None = None) -> None:
  """Writes imagenet_resized/64x64 as ArrayRecord into ``data_dir`` from ``zips``, from
  ``imagenet2012``, or (neither given) through TFDS's download."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if zips and imagenet2012:
    raise DataError("give --zips or --imagenet2012, not both.")
  if not zips and not imagenet2012:
    try:
      tfds.builder(NAME, data_dir=data_dir, file_format="array_record").download_and_prepare()
    except Exception as e:  # the download's errors are many and nested
      raise DataError(
          f"TFDS could not download ImageNet 64x64 ({type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''}). Download "
          f"{', '.join(n for ns in ZIPS.values() for n in ns)} from {DOWNLOAD_PAGE} (signed "
          "in) and run again with --zips=FOLDER, or build from ImageNet 2012 with "
          "--imagenet2012=FOLDER.") from e
    return
  if zips:
    paths = check_zips(zips, verify)
    examples = {split: (lambda p=p: zip_examples(p)) for split, p in paths.items()}
  else:
    missing = [n for n in TARS.values() if not os.path.isfile(os.path.join(imagenet2012, n))]
    if missing:
      raise DataError(f"{missing} not found in {imagenet2012}: ImageNet 2012's tars come from "
                      f"{DOWNLOAD_PAGE} (signed in).")
    workers = workers or os.cpu_count() or 1
    examples = {split: (lambda s=split: tar_examples(os.path.join(imagenet2012, TARS[s]), s,
                                                     workers)) for split in TARS}
  builder_class = _builder_class()
  builder_class.examples = examples
  builder_class(config=f"{SIZE}x{SIZE}", data_dir=data_dir,
                file_format="array_record").download_and_prepare()


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  try:
    prepare(f.data_dir, f.zips, f.imagenet2012, f.verify, f.workers)
  except DataError as e:
    raise SystemExit(f"cfgdiff: error: {e}") from None
  print(f"{NAME} prepared as ArrayRecord in {f.data_dir}; train with "
        f"--config.data.path={f.data_dir}")


if __name__ == "__main__":
  flags.DEFINE_string("data_dir", None, "TFDS data_dir to write into (--config.data.path)")
  flags.DEFINE_string("zips", "", "folder holding the three ImageNet 64x64 zips")
  flags.DEFINE_string("imagenet2012", "", "folder holding ImageNet 2012's train and val tars")
  flags.DEFINE_bool("verify", True, "check the zips' SHA-256 against TFDS's record")
  flags.DEFINE_integer("workers", 0, "processes resizing ImageNet 2012 (0: one per core)")
  flags.mark_flag_as_required("data_dir")
  app.run(main)
