"""ImageNet 64 prepared without TFDS's download, both ways, on files the test writes in the
real layouts: the downsampled zips (npz batches of flat CHW images, labels from 1) and
ImageNet 2012's tars. Both must give what training reads from TFDS's own build."""

import io
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cfgdiff import data, prepare_imagenet64, sources
from tests import tfds_datasets
from tests.conftest import ROOT


def write_zips(folder: str, per_zip: int = 5, seed: int = 0) -> dict[str, tuple]:
  """The three zips, each holding npz batches as the released ones do; returns {split:
  (images uint8 [N, 64, 64, 3], labels 0-based [N])} in the order written."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  written = {}
  for split, names in prepare_imagenet64.ZIPS.items():
    images, labels = [], []
    for z, name in enumerate(names):
      with zipfile.ZipFile(os.path.join(folder, name), "w") as archive:
        for b in range(2):  # two batches per zip
          batch = rng.integers(0, 256, (per_zip, 64, 64, 3)).astype(np.uint8)
          label = rng.integers(1, 1001, per_zip)  # stored from 1
          out = io.BytesIO()
          np.savez(out, data=batch.transpose(0, 3, 1, 2).reshape(per_zip, -1), labels=label,
                   mean=np.zeros(3))
          archive.writestr(f"{name[:-4]}/{split}_data_batch_{z}{b}.npz", out.getvalue())
          images.append(batch)
          labels.append(label - 1)
    written[split] = (np.concatenate(images), np.concatenate(labels))
  return written


def _config(data_dir: str):
  from experiments import get_experiment
  config = get_experiment("imagenet64")
  config.data.path = data_dir
  return config


def _read(data_dir: str, role: str) -> tuple[np.ndarray, np.ndarray]:
  split = sources.open_split(_config(data_dir).data, role)
  return split.source.read(np.arange(len(split.source)))


def test_from_zips_downloaded_by_hand(tmp_path):
  written = write_zips(str(tmp_path / "zips"))
  with pytest.raises(data.DataError, match="Imagenet64_train_part1_npz.zip has SHA-256 .* not "
                     "the 9422dc1dc5d0.* TFDS records for it"):
    prepare_imagenet64.prepare(str(tmp_path / "tfds"), zips=str(tmp_path / "zips"))
  prepare_imagenet64.prepare(str(tmp_path / "tfds"), zips=str(tmp_path / "zips"), verify=False)
  for role, split in (("train", "train"), ("held_out", "validation")):
    images, labels = _read(str(tmp_path / "tfds"), role)
    expected_images, expected_labels = written[split]
    # TFDS writes in its own shuffled order: match each stored image to the one written.
    order = {img.tobytes(): k for k, img in enumerate(expected_images)}
    found = [order[img.tobytes()] for img in images]
    assert sorted(found) == list(range(len(expected_images)))
    np.testing.assert_array_equal(labels, expected_labels[found])


def test_from_imagenet2012_tars_by_the_zips_box_downsampling(tmp_path):
  manual = str(tmp_path / "ilsvrc")
  written = tfds_datasets.write_imagenet2012_manual(manual, num_classes=3, per_class=3,
                                                    num_val=4)
  prepare_imagenet64.prepare(str(tmp_path / "tfds"), imagenet2012=manual, workers=2)
  images, labels = _read(str(tmp_path / "tfds"), "train")
  assert images.shape == (9, 64, 64, 3) and images.dtype == np.uint8
  names = tfds_datasets.imagenet_synsets(3)
  order = (tfds.core.tfds_path("image_classification/imagenet_resized_labels.txt")
           .read_text().split())
  expected = {prepare_imagenet64.downsample(jpeg).tobytes(): order.index(names[k])
              for k, jpeg in written.values()}
  # The whole image box-resized, aspect not kept (the dark sides stay), with the
  # zips' label of its synset.
  assert {img.tobytes(): int(lab) for img, lab in zip(images, labels, strict=True)} == expected
  whole = np.asarray(Image.open(io.BytesIO(next(iter(written.values()))[1])).convert("RGB")
                     .resize((64, 64), Image.BOX))
  assert any(np.array_equal(whole, img) for img in images)
  val_images, _ = _read(str(tmp_path / "tfds"), "held_out")
  assert val_images.shape == (4, 64, 64, 3)


def test_both_paths_write_the_dataset_tfds_would(tmp_path):
  """Same name, version, features and splits as TFDS's own builder (a build of it from
  arrays, tests/tfds_datasets.py): training reads any of them the same way."""
  write_zips(str(tmp_path / "zips"), per_zip=2)
  prepare_imagenet64.prepare(str(tmp_path / "a"), zips=str(tmp_path / "zips"), verify=False)
  tfds_datasets.write_imagenet2012_manual(str(tmp_path / "ilsvrc"), num_classes=2, per_class=2,
                                          num_val=2)
  prepare_imagenet64.prepare(str(tmp_path / "b"), imagenet2012=str(tmp_path / "ilsvrc"),
                             workers=1)
  tfds_datasets.build_imagenet_resized64(str(tmp_path / "c"), num_train=4, num_val=2)
  infos = [tfds.builder("imagenet_resized/64x64", data_dir=str(tmp_path / d)).info
           for d in "abc"]
  assert len({(str(i.version), repr(i.features), tuple(sorted(i.splits)),
               tuple(f.value for f in i.available_file_formats())) for i in infos}) == 1
  assert sorted(infos[0].splits) == ["train", "validation"]


def test_cli_says_what_is_missing_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "cfgdiff.prepare_imagenet64",
                         f"--data_dir={tmp_path / 'tfds'}", f"--zips={tmp_path}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("cfgdiff: error: ") and "Traceback" not in proc.stderr
  assert "Imagenet64_train_part1_npz.zip" in lines[-1] and "not found" in lines[-1]
  assert "--imagenet2012=FOLDER" in lines[-1]
