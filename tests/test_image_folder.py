"""A user's own folder of images (one sub-folder per class), and any TFDS dataset by name:
reading, the one-line errors, and the real CLI training, resuming bit for bit and sweeping
on a folder the test writes."""

import csv
import os
import pickle

import jax
import numpy as np
import pytest
from PIL import Image

from cfgdiff import data, image_folder, sources
from tests.conftest import TINY_CONFIG, run_cli
from tests.test_train import _final_state

CLASSES = ("bird", "cat", "dog", "frog")


def write_folder(root, per_class: int = 12, held_out: int = 3, size: int = 8,
                 seed: int = 0) -> dict:
  """DIR/train/CLASS/*.png and DIR/val/CLASS/*.png: class k is a bright k-th quadrant in
  colour k on noise. Returns {relative path: (label, uint8 [size, size, 3])}."""
  rng = np.random.default_rng(seed)
  written, half = {}, size // 2
  for split, count in (("train", per_class), ("val", held_out)):
    for label, name in enumerate(CLASSES):
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      for i in range(count):
        image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        r, c = divmod(label, 2)
        image[r * half:(r + 1) * half, c * half:(c + 1) * half, label % 3] = 230
        path = os.path.join(split, name, f"{i:03d}.png")
        Image.fromarray(image).save(os.path.join(root, path))
        written[path] = (label, image)
  with open(os.path.join(root, "train", "README.txt"), "w") as f:
    f.write("not an image: ignored")
  return written


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("images"))
  return root, write_folder(root)


def folder_config(root: str):
  from tests import tiny_config
  config = tiny_config.get_config()
  config.data.update(name="image_folder", path=root, channels=3)
  return config


def test_splits_classes_and_pixels_are_read_as_written(folder):
  root, written = folder
  train = sources.open_split(folder_config(root).data, "train")
  held_out = sources.open_split(folder_config(root).data, "held_out")
  assert (train.name, held_out.name) == ("train", "val")
  assert train.source.class_names == list(CLASSES) and len(train.source) == 48
  assert len(held_out.source) == 12
  images, labels = train.source.read(np.arange(48))
  assert images.shape == (48, 8, 8, 3) and images.dtype == np.uint8 and labels.dtype == np.int32
  expected = sorted((p, v) for p, v in written.items() if p.startswith("train"))
  for (path, (label, image)), got, got_label in zip(expected, images, labels, strict=True):
    np.testing.assert_array_equal(got, image, err_msg=path)  # PNG: bit-exact
    assert got_label == label
  # grain sends the source to its worker processes.
  clone = pickle.loads(pickle.dumps(train.source))
  np.testing.assert_array_equal(clone.read(np.array([7, 3]))[0], images[[7, 3]])


def test_one_split_layout_grey_and_centre_crop(tmp_path):
  """DIR/CLASS/*.png is one split; larger images get ADM's centre crop and resize; channels=1
  reads grey."""
  for label, name in enumerate(("a", "b")):
    os.makedirs(tmp_path / name)
    image = np.full((16, 24, 3), 10, np.uint8)
    image[:, 4:20] = 100 + 100 * label  # the centre square
    Image.fromarray(image).save(tmp_path / name / "x.png")
  assert image_folder.splits(str(tmp_path)) == {"train": str(tmp_path)}
  assert image_folder.held_out_split(str(tmp_path)) is None
  source = image_folder.ImageFolderSource(str(tmp_path), "train", 8, 1)
  images, labels = source.read(np.array([0, 1]))
  assert images.shape == (2, 8, 8, 1) and list(labels) == [0, 1]
  assert images[0].max() == images[0].min() == 100 and images[1].min() == 200
  config = folder_config(str(tmp_path))
  config.data.num_classes = 2
  with pytest.raises(data.DataError, match="no held-out split .* --config.data.eval_split"):
    sources.open_split(config.data, "held_out")


def test_fingerprint_changes_with_the_files(tmp_path):
  write_folder(str(tmp_path), per_class=2, held_out=1)
  before = image_folder.ImageFolderSource(str(tmp_path), "train", 8, 3).fingerprint()
  assert before == image_folder.ImageFolderSource(str(tmp_path), "train", 8, 3).fingerprint()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / "cat" / "new.png")
  after = image_folder.ImageFolderSource(str(tmp_path), "train", 8, 3).fingerprint()
  assert after["examples"] == before["examples"] + 1 and after["sha256"] != before["sha256"]


def _break(kind: str, root) -> None:
  if kind == "no_classes":
    for name in os.listdir(root / "train"):
      if os.path.isdir(root / "train" / name):
        for f in os.listdir(root / "train" / name):
          os.rename(root / "train" / name / f, root / "train" / f"{name}_{f}")
        os.rmdir(root / "train" / name)
  elif kind == "mixed_sizes":
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(root / "train" / "dog" / "odd.png")
  elif kind == "unreadable":
    (root / "train" / "cat" / "broken.png").write_bytes(b"not a png")
  elif kind == "empty_class":
    os.makedirs(root / "train" / "zebra")


@pytest.mark.parametrize("kind, override, message", [
    ("no_classes", {}, "has no class sub-folders; image_folder needs one sub-folder"),
    ("mixed_sizes", {}, "mixed sizes: bird/000.png is 8x8, dog/odd.png is 8x9. Resize"),
    ("unreadable", {}, "broken.png cannot be read as an image (UnidentifiedImageError"),
    ("empty_class", {}, "class folder(s) ['zebra'] hold no images"),
    (None, {"num_classes": 5}, "4 class folders (bird, cat, dog, frog), but "
     "config.data.num_classes=5; pass --config.data.num_classes=4"),
    (None, {"path": "/nonexistent"}, "config.data.path=/nonexistent is not a folder"),
    (None, {"eval_split": "test"}, "has no split 'test'; it has ['train', 'val']"),
])
def test_bad_folders_are_refused_in_one_line(tmp_path, kind, override, message):
  write_folder(str(tmp_path), per_class=1, held_out=1)
  _break(kind, tmp_path)
  config = folder_config(str(tmp_path))
  config.data.update(override)
  with pytest.raises(data.DataError) as error:
    sources.open_split(config.data, "held_out" if "eval_split" in override else "train")
  assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_unknown_dataset_names_close_tfds_names_and_the_other_sources(tmp_path):
  config = folder_config(str(tmp_path))
  config.data.name = "cifar1O"
  with pytest.raises(data.DataError, match=r"TFDS has no dataset 'cifar1O'; close names: "
                     r"\[.*'cifar10'.*\]\. Pass --config.data.name=fashion_mnist, image_folder"):
    sources.open_split(config.data, "train")


def test_cli_trains_resumes_bitwise_and_sweeps_on_an_image_folder(folder, tmp_path):
  """The real CLI on the folder: 4 steps straight equal 2 + 2 resumed, bit for bit; a bad
  folder is refused before anything compiles; the sweep's Inception FID takes its reference
  from train/ and its floor from val/."""
  from tests.test_inception import write_random_pytorch_fid_weights
  root, _ = folder
  common = [f"--config={TINY_CONFIG}", "--config.data.name=image_folder",
            f"--config.data.path={root}", "--config.data.channels=3",
            "--config.data.random_flip=True", "--config.data.num_workers=1"]
  whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
  for workdir, steps in ((whole, 4), (split, 2), (split, 4)):
    proc = run_cli(*common, f"--workdir={workdir}", f"--config.train.num_steps={steps}",
                   "--config.train.checkpoint_every_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
  assert "from step 2" in proc.stderr
  a, b = (_final_state(w, 4, root) for w in (whole, split))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  refused = run_cli(*common, "--config.data.num_classes=3", f"--workdir={tmp_path / 'bad'}")
  errors = [l for l in refused.stderr.splitlines() if l.startswith("cfgdiff: error:")]
  assert refused.returncode == 2 and len(errors) == 1, refused.stderr[-2000:]
  assert "pass --config.data.num_classes=4" in errors[0]
  assert not os.path.exists(tmp_path / "bad")

  weights = str(tmp_path / "pt_inception-random.pth")
  write_random_pytorch_fid_weights(weights, seed=0)
  proc = run_cli(*common, f"--workdir={whole}", "--mode=sweep",
                 "--config.sweep.feature_net=inception",
                 f"--config.sweep.inception_weights={weights}",
                 f"--config.sweep.cache_dir={tmp_path / 'cache'}",
                 "--config.sweep.num_samples=8", "--config.sweep.num_steps=4",
                 "--config.sweep.guidance_weights=(0.0,2.0)", "--config.sweep.bootstrap=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(whole, "sweep", "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["step"], r["w"]) for r in rows] == [("4", "0.0"), ("4", "2.0")]
  assert all(np.isfinite(float(r["fid"])) for r in rows)
  report = open(os.path.join(whole, "sweep", "results.md")).read()
  assert "held-out split val" in report and "reference: split train" in report
