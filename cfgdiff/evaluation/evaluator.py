"""Scores for a stream of generated images against a real reference set.

An Evaluator owns a feature network (features for FID and precision/recall, class
probabilities for the score and accuracy), the reference statistics, and the floor:
the same metrics for real training images, the best a model can be expected to reach
with that many samples.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import ml_collections
import numpy as np
from absl import logging

from cfgdiff import configs, data
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
    is_mean, is_std = metrics.inception_score(probs)
    # Both sets equally large: precision and recall depend on the sample sizes.
    n = min(len(pr_features), len(self.reference_features))
    precision, recall = metrics.precision_recall(self.reference_features[:n], pr_features[:n],
                                                 k=self.pr_k)
    return dict(fid=metrics.fid(stats, self.reference_stats), is_mean=is_mean, is_std=is_std,
                precision=precision, recall=recall,
                accuracy=metrics.class_accuracy(probs, labels))

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
      os.path.join(cache_dir, "classifier"), dc.path, dc.num_classes, sw.classifier_epochs)
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


def make_evaluator(config: ml_collections.ConfigDict, run_config: ml_collections.ConfigDict,
                   cache_dir: str) -> Evaluator:
  """The evaluator config.sweep.feature_net names, for data like ``run_config``'s."""
  if config.sweep.feature_net == "classifier":
    if run_config.data.name != "fashion_mnist":
      raise configs.ConfigError(
          "config.sweep.feature_net='classifier' is the Fashion-MNIST classifier; use "
          "'inception' for other data.")
    return _fashion_evaluator(config, run_config, cache_dir)
  raise configs.ConfigError(
      "config.sweep.feature_net='inception' needs a reference set of real images in the "
      "Inception feature space, which the Fashion-MNIST input does not provide; use "
      "'classifier' for Fashion-MNIST.")
