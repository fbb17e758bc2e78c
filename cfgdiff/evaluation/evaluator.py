"""Scores for a stream of generated images against a real reference set.

An Evaluator owns a feature network (features for FID and precision/recall, class
probabilities for the score and accuracy), the reference statistics, and the floor:
the same metrics for real training images, the best a model can be expected to reach
with that many samples.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import ml_collections
import numpy as np
from absl import logging

from cfgdiff import configs, data, files
from cfgdiff.evaluation import metrics

# images uint8 [N,H,W,C] -> (features float32 [N,D], class probabilities float32 [N,K])
FeatureFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass
class Accumulator:
  """Streams generated images through the feature net; keeps float64 sums, the class
  probabilities and at most ``pr_max_points`` feature vectors, never the images."""
  evaluator: Evaluator
  stats: metrics.GaussianStats = None
  probs: list = dataclasses.field(default_factory=list)
  labels: list = dataclasses.field(default_factory=list)
  pr_features: list = dataclasses.field(default_factory=list)
  pr_count: int = 0

  def update(self, images: np.ndarray, labels: np.ndarray) -> None:
    features, probs = self.evaluator.features(images)
    if self.stats is None:
      self.stats = metrics.GaussianStats(features.shape[1])
    self.stats.update(features)
    self.probs.append(probs)
    self.labels.append(np.asarray(labels))
    keep = max(0, self.evaluator.pr_max_points - self.pr_count)
    self.pr_features.append(features[:keep])
    self.pr_count += len(features[:keep])

  def result(self) -> dict[str, float]:
    return self.evaluator.score(self.stats, np.concatenate(self.probs),
                                np.concatenate(self.labels), np.concatenate(self.pr_features))


class Evaluator:
  """FID against ``reference_stats``, precision/recall against ``reference_features``."""

  def __init__(self, features: FeatureFn, reference_stats: metrics.GaussianStats,
               reference_features: np.ndarray, pr_k: int, pr_max_points: int):
    self.features = features
    self.reference_stats = reference_stats
    self.reference_features = reference_features[:pr_max_points]
    self.pr_k, self.pr_max_points = pr_k, pr_max_points
    self.floor: dict[str, float] = {}

  def accumulator(self) -> Accumulator:
    return Accumulator(self)

  def score(self, stats: metrics.GaussianStats, probs: np.ndarray, labels: np.ndarray,
            pr_features: np.ndarray) -> dict[str, float]:
    # Without a classifier head (the FID-only Inception weights) there is no score and
    # no accuracy: NaN, never a number from something else.
    has_classes = probs.shape[1] > 0
    is_mean, is_std = metrics.inception_score(probs) if has_classes else (math.nan, math.nan)
    # Both sets equally large: precision and recall depend on the sample sizes.
    n = min(len(pr_features), len(self.reference_features))
    precision, recall = metrics.precision_recall(self.reference_features[:n], pr_features[:n],
                                                 k=self.pr_k)
    return dict(fid=metrics.fid(stats, self.reference_stats), is_mean=is_mean, is_std=is_std,
                precision=precision, recall=recall,
                accuracy=metrics.class_accuracy(probs, labels) if has_classes else math.nan)

  def evaluate(self, images: np.ndarray, labels: np.ndarray, chunk: int = 1000) -> dict:
    """All metrics of a set of images already in memory (e.g. real ones)."""
    acc = self.accumulator()
    for start in range(0, len(images), chunk):
      acc.update(images[start:start + chunk], labels[start:start + chunk])
    return acc.result()


def _fashion_evaluator(config: ml_collections.ConfigDict, run_config: ml_collections.ConfigDict,
                       cache_dir: str) -> Evaluator:
  from cfgdiff.evaluation import classifier  # pylint: disable=g-import-not-at-top
  dc, sw = run_config.data, config.sweep
  features, test_accuracy = classifier.load_or_train(
      str(files.path(cache_dir) / "classifier"), dc.path, dc.num_classes, sw.classifier_epochs)
  logging.info("Evaluation classifier: %.2f%% test accuracy.", 100 * test_accuracy)
  test_images, _ = data.load_fashion_mnist(dc.path, "test")
  test_features, _ = features(test_images)
  reference = metrics.GaussianStats(test_features.shape[1])
  reference.update(test_features)
  order = np.random.default_rng(0).permutation(len(test_images))
  evaluator = Evaluator(features, reference, test_features[order], sw.pr_k, sw.pr_max_points)
  # The floor: as many real training images as samples per cell, same metrics.
  train_images, train_labels = data.load_fashion_mnist(dc.path, "train")
  pick = np.random.default_rng(1).permutation(len(train_images))[:sw.num_samples]
  evaluator.floor = evaluator.evaluate(train_images[pick], train_labels[pick])
  evaluator.floor["classifier_test_accuracy"] = test_accuracy
  return evaluator


def _inception_evaluator(config: ml_collections.ConfigDict,
                         run_config: ml_collections.ConfigDict) -> Evaluator:
  """FID Inception features; reference: sweep.num_samples training images of the run's
  TFDS dataset (ADM's convention); floor: as many validation images."""
  from cfgdiff.evaluation import inception  # pylint: disable=g-import-not-at-top
  dc, sw = run_config.data, config.sweep
  if sw.inception_weights:
    try:
      import torch  # pylint: disable=g-import-not-at-top
      state = torch.load(sw.inception_weights, map_location="cpu")
    except Exception as e:  # missing torch, missing or damaged file
      raise inception.InceptionWeightsError(
          f"config.sweep.inception_weights={sw.inception_weights!r} cannot be read as a "
          f"pytorch-fid state dict ({type(e).__name__}: {e}).") from e
    variables = inception.variables_from_pytorch_fid(state)
  else:
    variables = inception.load_fid_inception()
  features = inception.InceptionFeatures(variables)
  if dc.name not in data.TFDS_DATASETS:
    raise configs.ConfigError(f"config.sweep.feature_net='inception' needs real images of "
                              f"a TFDS dataset {data.TFDS_DATASETS}; got {dc.name!r}.")

  def real(split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    source = data.TfdsSource(dc.name, split, dc.path, dc.image_size)
    pick = np.sort(np.random.default_rng(seed).permutation(len(source))[:sw.num_samples])
    return source.read(pick)

  logging.info("Inception features of %d reference images.", sw.num_samples)
  ref_images, _ = real("train", 0)
  ref_features, _ = features(ref_images)
  reference = metrics.GaussianStats(ref_features.shape[1])
  reference.update(ref_features)
  evaluator = Evaluator(features, reference, ref_features, sw.pr_k, sw.pr_max_points)
  evaluator.floor = evaluator.evaluate(*real("validation", 1))
  return evaluator


def make_evaluator(config: ml_collections.ConfigDict, run_config: ml_collections.ConfigDict,
                   cache_dir: str) -> Evaluator:
  """The evaluator config.sweep.feature_net names, for data like ``run_config``'s."""
  if config.sweep.feature_net == "inception":
    return _inception_evaluator(config, run_config)
  if run_config.data.name != "fashion_mnist":
    raise configs.ConfigError(
        "config.sweep.feature_net='classifier' is the Fashion-MNIST classifier; use "
        "'inception' for other data.")
  return _fashion_evaluator(config, run_config, cache_dir)
