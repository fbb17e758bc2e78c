"""The evaluation classifier shipped in cfgdiff/reference_models/fashion_mnist: trained on
exactly the installed Fashion-MNIST training split, scoring the test accuracy its manifest records,
used by default on that data only, and refused with the fix when its file is corrupt."""

import json
import shutil

import numpy as np
import pytest

from cfgdiff import configs, reference, sources
from cfgdiff.evaluation import classifier

DATA = configs.default_config().data.path


@pytest.fixture(scope="module")
def manifest():
  return json.loads((classifier.SHIPPED_DIR / classifier.SHIPPED_MANIFEST).read_text())


@pytest.fixture(scope="module")
def train_split():
  return sources.load_fashion_mnist(DATA, "train")


def test_shipped_classifier_was_trained_on_the_installed_training_split(manifest, train_split):
  assert manifest["train_data_sha256"] == classifier.data_digest(*train_split)
  assert manifest["epochs"] == configs.default_config().sweep.classifier_epochs
  assert manifest["bytes"] == (classifier.SHIPPED_DIR / classifier.SHIPPED_PARAMS).stat().st_size
  assert len(manifest["commit"]) == 40 and "cfgdiff.evaluation.classifier" in manifest["command"]


def test_shipped_classifier_scores_its_recorded_test_accuracy(manifest, tmp_path, monkeypatch):
  def no_training(*args, **kwargs):
    raise AssertionError("the shipped classifier should have been used")
  monkeypatch.setattr(classifier, "train_classifier", no_training)
  features, accuracy = classifier.load_or_train(str(tmp_path), DATA, 10, manifest["epochs"])
  assert accuracy == manifest["test_accuracy"]
  # Recomputed over the 10,000 test images: other CPUs may round a few logits differently
  # (0.1% = 10 images); a wrong or mis-loaded parameter costs far more.
  assert classifier.test_accuracy(features, DATA) == pytest.approx(accuracy, abs=1e-3)
  assert accuracy > 0.9
  assert not (tmp_path / "classifier.msgpack").exists(), "nothing to cache"


def test_shipped_classifier_serves_only_its_own_data_and_epochs(manifest, train_split):
  images, labels = train_split
  image_shape = images.shape[1:]
  ok = classifier.load_shipped(classifier.data_digest(images, labels), 10, manifest["epochs"],
                               image_shape)
  assert ok is not None
  changed = labels.copy()
  changed[0] = (changed[0] + 1) % 10
  assert classifier.load_shipped(classifier.data_digest(images, changed), 10,
                                 manifest["epochs"], image_shape) is None
  assert classifier.load_shipped(classifier.data_digest(images, labels), 10,
                                 manifest["epochs"] + 1, image_shape) is None


def test_a_corrupt_shipped_classifier_is_refused_with_the_fix(manifest, train_split, tmp_path):
  shutil.copytree(classifier.SHIPPED_DIR, tmp_path / "weights")
  path = tmp_path / "weights" / classifier.SHIPPED_PARAMS
  blob = bytearray(path.read_bytes())
  blob[len(blob) // 2] ^= 1
  path.write_bytes(bytes(blob))
  digest = classifier.data_digest(*train_split)
  fix = "corrupt.*git checkout.*shipped_classifier=False"
  with pytest.raises(reference.ShippedModelError, match=fix):
    classifier.load_shipped(digest, 10, manifest["epochs"], (28, 28, 1), tmp_path / "weights")
  path.unlink()
  with pytest.raises(reference.ShippedModelError, match="missing or corrupt"):
    classifier.load_shipped(digest, 10, manifest["epochs"], (28, 28, 1), tmp_path / "weights")


def test_data_digest_depends_on_content_not_on_layout():
  images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
  labels = np.array([0, 1])
  assert classifier.data_digest(images, labels) == classifier.data_digest(
      np.asfortranarray(images), labels.astype(np.int64))
  assert classifier.data_digest(images, labels) != classifier.data_digest(images[::-1], labels)
