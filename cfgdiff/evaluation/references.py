"""What generated images are scored against: the real images' reference and floor.

The FID Inception (ImageNet) takes its reference as ADM does: statistics of the whole
training split of the run's data, each process reading a contiguous part of it, computed
once and cached under config.sweep.cache_dir (`reference_statistics`), keyed by dataset,
split, image size, example count, precision/recall subset size and the SHA-256 of the
Inception weights, so every run and sweep on that data shares them. The Fashion-MNIST
classifier takes all 60,000 training images. The floor is the same metrics for held-out
real images. `make_evaluator` builds the `evaluator.Evaluator` config.sweep names.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from cfgdiff import configs, data, files, multihost, sources
from cfgdiff.evaluation import metrics
from cfgdiff.evaluation.evaluator import (
    Evaluator,
    FeatureFn,
    Partial,
    Scores,
    reduce_across_processes,
)
from cfgdiff.progress import Progress

# Bump when the meaning of a cached reference changes (preprocessing, crop, features).
REFERENCE_CACHE_VERSION = 1
_READ_BATCH = 500  # real images read and featurized at a time


def _read_ahead(read: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, ...]]:
  """(batch, *read(batch)) for each batch; the next batch is read (JPEG decoding, ADM's
  crop) in a thread while the caller runs the feature net."""
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    future = pool.submit(read, batches[0]) if batches else None
    for i, batch in enumerate(batches):
      images, labels = future.result()
      if i + 1 < len(batches):
        future = pool.submit(read, batches[i + 1])
      yield batch, images, labels


def _batches(indices: np.ndarray, size: int = _READ_BATCH) -> list[np.ndarray]:
  return [indices[s:s + size] for s in range(0, len(indices), size)]


def reference_partial(source: data.Source, features: FeatureFn,
                      pr_indices: np.ndarray, dim: int,
                      what: str = "Reference statistics") -> Partial:
  """This process's contiguous share of one pass over all of ``source`` (``len`` and
  ``read(indices) -> (uint8 images, labels)``): the float64 sums of every feature, and
  the features of the examples listed in ``pr_indices`` (sorted)."""
  lo, hi = multihost.process_share(len(source))
  part = Partial.empty(dim)
  pr_features, pr_order = [part.pr_features], [part.pr_order]
  progress = Progress(f"{what} (this process)", hi - lo, every=60)
  for indices, images, _ in _read_ahead(source.read, _batches(np.arange(lo, hi))):
    feats = np.asarray(features(images)[0], np.float32)
    part.stats.update(feats)
    chosen = np.isin(indices, pr_indices)
    pr_features.append(feats[chosen])
    pr_order.append(indices[chosen].astype(np.int64))
    progress.advance(len(indices))
  return dataclasses.replace(part, pr_features=np.concatenate(pr_features),
                             pr_order=np.concatenate(pr_order))


def reference_cache_name(dataset: str, split: str, image_size: int, num_examples: int,
                         weights_sha256: str, pr_points: int) -> str:
  """File name of cached reference statistics: everything that determines them."""
  return (f"reference_{dataset.replace('/', '-')}_{split}_{image_size}px_{num_examples}ex_"
          f"pr{pr_points}_{weights_sha256[:16]}_v{REFERENCE_CACHE_VERSION}.npz")


def _read_reference_cache(path: str, num_examples: int, pr_indices: np.ndarray
                          ) -> tuple[metrics.GaussianStats, np.ndarray] | None:
  location = files.path(path)
  if not location.exists():
    return None
  try:
    with np.load(io.BytesIO(location.read_bytes())) as f:
      stats = metrics.GaussianStats(f["total"].shape[0], count=int(f["count"]),
                                    total=f["total"], outer=f["outer"])
      cached_pr, pr_features = f["pr_indices"], f["pr_features"]
  except (OSError, ValueError, KeyError) as e:
    logging.warning("Ignoring the unreadable reference cache %s (%s).", path, e)
    return None
  if stats.count != num_examples or not np.array_equal(cached_pr, pr_indices):
    logging.warning("Ignoring %s: it was computed for other examples.", path)
    return None
  return stats, pr_features


def _write_reference_cache(path: str, stats: metrics.GaussianStats, pr_indices: np.ndarray,
                           pr_features: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, count=stats.count, total=stats.total, outer=stats.outer,
           pr_indices=pr_indices, pr_features=pr_features)
  files.write_atomic(path, buffer.getvalue())


def reference_statistics(source: data.Source, features: FeatureFn,
                         pr_indices: np.ndarray, dim: int, cache_path: str,
                         what: str = "Reference statistics"
                         ) -> tuple[metrics.GaussianStats, np.ndarray]:
  """(float64 statistics of all of ``source``, features [len(pr_indices), dim] of the
  examples in ``pr_indices``), from ``cache_path`` if it holds them, else computed, each
  process on its share, and written there by process 0. Collective.

  Process 0 alone decides whether the cache holds them and sends what it read, so hosts
  with a local cache directory (~/.cache on each VM) agree.
  """
  first = jax.process_index() == 0
  cached = _read_reference_cache(cache_path, len(source), pr_indices) if first else None
  if multihost.agreed(cached is not None) and jax.process_count() > 1:
    # Process 0 sends what it read; the others pass empty arrays of the same dtype and rank.
    stats, pr_features = cached or (metrics.GaussianStats(dim), np.zeros((0, dim), np.float32))
    total, outer, count, pr_features = (multihost.broadcast(x) for x in (
        stats.total, stats.outer, np.array([stats.count]), pr_features))
    cached = metrics.GaussianStats(dim, int(count[0]), total, outer), pr_features
  if cached is not None:
    logging.info("%s: read from %s.", what, cache_path)
    return cached
  logging.info("%s: %d examples (this process: %d..%d), cached afterwards at %s.", what,
               len(source), *multihost.process_share(len(source)), cache_path)
  part = reduce_across_processes(reference_partial(source, features, pr_indices, dim, what),
                                 len(pr_indices))
  if first:
    try:
      _write_reference_cache(cache_path, part.stats, pr_indices, part.pr_features)
    except OSError as e:  # a read-only cache must not cost the statistics just computed
      logging.warning("Could not cache the reference statistics at %s: %s", cache_path, e)
  return part.stats, part.pr_features


def real_floor(evaluator: Evaluator, source: data.Source,
               num_samples: int, seed: int) -> Scores:
  """The metrics of ``num_samples`` real images of ``source`` (a seeded random subset;
  all of them if there are no more: ImageNet's 50,000 validation images, 50 per class),
  each process reading its own share. Collective."""
  n = len(source)
  if num_samples > n:
    logging.warning("The floor uses all %d real images, fewer than the %d samples per cell.",
                    n, num_samples)
  pick = (np.arange(n) if num_samples >= n else
          np.sort(np.random.default_rng(seed).permutation(n)[:num_samples]))
  lo, hi = multihost.process_share(len(pick))
  acc = evaluator.accumulator()
  progress = Progress("Floor, real images (this process)", hi - lo, every=60)
  read = lambda positions: source.read(pick[positions])
  for positions, images, labels in _read_ahead(read, _batches(np.arange(lo, hi))):
    acc.update(images, labels, positions)
    progress.advance(len(positions))
  return acc.result()


def class_balanced_pick(labels: np.ndarray, num: int, num_classes: int,
                        seed: int) -> np.ndarray:
  """Positions of ``num`` examples whose classes are taken in turn (0, 1, ..., K-1, 0,
  ...: the order a sweep draws its samples in), each class's examples in a seeded random
  order; ``num`` is cut to what the scarcest class allows, with a warning."""
  labels = np.asarray(labels).reshape(-1)
  rng = np.random.default_rng(seed)
  pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
  limit = num_classes * min(len(p) for p in pools)
  if num > limit:
    logging.warning("A class-balanced set of real images holds at most %d, not %d.", limit,
                    num)
    num = limit
  wanted = np.arange(num) % num_classes
  pick = np.empty(num, np.int64)
  for c in range(num_classes):
    pick[wanted == c] = pools[c][:np.sum(wanted == c)]
  return pick


def _fashion_evaluator(config: ml_collections.ConfigDict, run_config: ml_collections.ConfigDict,
                       cache_dir: str) -> Evaluator:
  """The classifier's features. Reference: all 60,000 training images (the split the
  model learned, as ADM takes ImageNet's); floor: held-out test images, class-balanced,
  as many as samples per cell: what a model that draws new images from the data
  distribution would score."""
  from cfgdiff.evaluation import classifier  # pylint: disable=g-import-not-at-top
  dc, sw = run_config.data, config.sweep
  features, test_accuracy = classifier.load_or_train(
      str(files.path(cache_dir) / "classifier"), dc.path, dc.num_classes, sw.classifier_epochs,
      sw.shipped_classifier)
  logging.info("Evaluation classifier: %.2f%% test accuracy.", 100 * test_accuracy)
  train_images, _ = sources.load_fashion_mnist(dc.path, "train")
  train_features, _ = features(train_images)
  reference = metrics.GaussianStats(train_features.shape[1])
  reference.update(train_features)
  order = np.random.default_rng(0).permutation(len(train_images))
  evaluator = Evaluator(features, reference, train_features[order], sw.pr_k, sw.pr_max_points,
                        sw.score_splits, sw.bootstrap)
  test_images, test_labels = sources.load_fashion_mnist(dc.path, "test")
  pick = class_balanced_pick(test_labels, sw.num_samples, dc.num_classes, seed=1)
  evaluator.floor = evaluator.evaluate(test_images[pick], test_labels[pick]).values
  evaluator.floor |= dict(num_images=float(len(pick)), classifier_test_accuracy=test_accuracy,
                         reference_split="train", floor_split="test")
  return evaluator


def _inception_features(sweep: ml_collections.ConfigDict,
                        weights_dir: str) -> tuple[FeatureFn, str, int]:
  """(FID Inception features, SHA-256 of its weights file, feature dimension)."""
  from cfgdiff.evaluation import inception, inception_weights  # pylint: disable=g-import-not-at-top
  variables, digest = inception_weights.load_weights(sweep.inception_weights, weights_dir)
  return inception.InceptionFeatures(variables), digest, inception.FEATURE_DIM


def cache_dirs(sweep: ml_collections.ConfigDict) -> tuple[str, str]:
  """(directory of cached reference statistics, local directory of downloaded weights):
  config.sweep.cache_dir or ~/.cache/cfgdiff; weights stay on local disk when the
  statistics go to a bucket."""
  from cfgdiff.evaluation import inception_weights  # pylint: disable=g-import-not-at-top
  stats_dir = sweep.cache_dir or inception_weights.default_cache_dir()
  return stats_dir, stats_dir if "://" not in stats_dir else inception_weights.default_cache_dir()


def _inception_evaluator(config: ml_collections.ConfigDict,
                         run_config: ml_collections.ConfigDict) -> Evaluator:
  """FID Inception features; reference: the whole training split of the run's data
  (ADM's convention), cached; floor: sweep.num_samples images of its held-out split."""
  dc, sw = run_config.data, config.sweep
  train, held_out = sources.open_split(dc, "train"), sources.open_split(dc, "held_out")
  stats_dir, weights_dir = cache_dirs(sw)
  features, weights_sha256, dim = _inception_features(sw, weights_dir)
  # Precision/recall reference: a fixed random subset of the same split.
  n = len(train.source)
  pr_indices = np.sort(np.random.default_rng(0).permutation(n)[:sw.pr_max_points])
  name = reference_cache_name(train.cache_key, train.name, dc.image_size, n, weights_sha256,
                              len(pr_indices))
  reference, reference_features = reference_statistics(
      train.source, features, pr_indices, dim, str(files.path(stats_dir) / name),
      f"Reference statistics of {dc.name} {train.name}")
  evaluator = Evaluator(features, reference, reference_features, sw.pr_k, sw.pr_max_points,
                        sw.score_splits, sw.bootstrap)
  evaluator.floor = real_floor(evaluator, held_out.source, sw.num_samples, seed=1).values
  evaluator.floor["num_images"] = float(min(sw.num_samples, len(held_out.source)))
  evaluator.floor |= {"reference_split": train.name, "floor_split": held_out.name}
  return evaluator


def make_evaluator(config: ml_collections.ConfigDict, run_config: ml_collections.ConfigDict,
                   cache_dir: str) -> Evaluator:
  """The evaluator config.sweep.feature_net names, for data like ``run_config``'s.

  ``cache_dir`` holds the Fashion-MNIST classifier; Inception weights and reference
  statistics live under config.sweep.cache_dir (`cache_dirs`). Collective with several
  processes: every process must call it.
  """
  if config.sweep.feature_net == "inception":
    return _inception_evaluator(config, run_config)
  if run_config.data.name != "fashion_mnist":
    raise configs.ConfigError(
        "config.sweep.feature_net='classifier' is the Fashion-MNIST classifier; use "
        "'inception' for other data.")
  return _fashion_evaluator(config, run_config, cache_dir)
