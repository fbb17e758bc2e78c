"""Scores for a stream of generated images against a real reference set.

An Evaluator owns a feature network (features for FID and precision/recall, class
probabilities for the score and accuracy), the reference statistics, and the floor:
the same metrics for held-out real images, the best a model can be expected to reach
with that many samples. Every metric comes with a bootstrap standard error (`Scores`).
`references` builds the evaluator a sweep's config names, with its reference and floor.

Several processes (jax.process_count() > 1): every process streams only its own share
of the images through `Accumulator.update`, and `Accumulator.result`, which every process
calls, reduces across processes (float64 sums, class probabilities, labels,
precision/recall features) and returns the same scores on every process, those one
process would compute from all the images. One process reduces nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from cfgdiff import multihost
from cfgdiff.evaluation import metrics

# images uint8 [N,H,W,C] -> (features float32 [N,D], class probabilities float32 [N,K])
FeatureFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]



@dataclasses.dataclass
class Partial:
  """What the scores need of a set of images, from one process or merged.

  Every row of ``probs``/``labels`` and of ``pr_features`` carries the sample's global
  position (``order``/``pr_order``), so parts from any number of processes merge into
  the arrays one process would have built.
  """
  stats: metrics.GaussianStats  # float64 sums of the features [D]
  probs: np.ndarray  # float32 [n, K] (K = 0 without a classifier)
  labels: np.ndarray  # int64 [n], the requested classes
  order: np.ndarray  # int64 [n]
  pr_features: np.ndarray  # float32 [m, D], m <= pr_max_points
  pr_order: np.ndarray  # int64 [m]

  @classmethod
  def empty(cls, dim: int) -> Partial:
    return cls(metrics.GaussianStats(dim), np.zeros((0, 0), np.float32),
               np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, dim), np.float32),
               np.zeros(0, np.int64))


def merge_partials(parts: Sequence[Partial], pr_max_points: int) -> Partial:
  """One Partial for all the parts' images: statistics summed (in order), rows sorted by
  order, and the precision/recall features of the first ``pr_max_points`` by order."""
  stats = metrics.GaussianStats.combine([p.stats for p in parts])
  rows = [p for p in parts if len(p.order)]
  if rows:
    order = np.concatenate([p.order for p in rows])
    perm = np.argsort(order, kind="stable")
    probs = np.concatenate([p.probs for p in rows])[perm]
    labels, order = np.concatenate([p.labels for p in rows])[perm], order[perm]
  else:
    probs, labels, order = (np.zeros((0, 0), np.float32), np.zeros(0, np.int64),
                            np.zeros(0, np.int64))
  pr_order = np.concatenate([p.pr_order for p in parts])
  pick = np.argsort(pr_order, kind="stable")[:pr_max_points]
  pr_features = np.concatenate([p.pr_features for p in parts])[pick]
  return Partial(stats, probs, labels, order, pr_features, pr_order[pick])


def reduce_across_processes(part: Partial, pr_max_points: int) -> Partial:
  """Collective: `merge_partials` of every process's ``part``, on every process. Only the
  precision/recall features that make the global first ``pr_max_points`` travel."""
  stats = metrics.GaussianStats(
      part.stats.dim, count=int(multihost.sum_over_processes(np.array([part.stats.count]))[0]),
      total=multihost.sum_over_processes(part.stats.total),
      outer=multihost.sum_over_processes(part.stats.outer))
  everyone = lambda x: np.concatenate(multihost.gather_rows(x))
  all_pr_order = everyone(part.pr_order)
  keep = np.ones(len(part.pr_order), bool)
  if len(all_pr_order) > pr_max_points:
    keep = part.pr_order <= np.partition(all_pr_order, pr_max_points - 1)[pr_max_points - 1]
  merged = Partial(stats, everyone(part.probs), everyone(part.labels), everyone(part.order),
                   everyone(part.pr_features[keep]), everyone(part.pr_order[keep]))
  return merge_partials([merged], pr_max_points)


@dataclasses.dataclass
class Accumulator:
  """Streams images through the feature net; keeps float64 sums, the class
  probabilities and at most ``pr_max_points`` feature vectors, never the images.

  With several processes, each process calls `update` with ONLY ITS OWN SHARE of the
  images (any split), and every process calls `result`, which is collective: it reduces
  over processes and returns the scores of all the images on every process. Each image
  comes with its global index (e.g. that of its noise seed), so the result does not
  depend on how the images were split: rows are put in index order before the score's
  contiguous splits and the bootstrap, and the precision/recall set is the first
  ``pr_max_points`` by index.
  """
  evaluator: Evaluator
  stats: metrics.GaussianStats | None = None
  probs: list = dataclasses.field(default_factory=list)
  labels: list = dataclasses.field(default_factory=list)
  order: list = dataclasses.field(default_factory=list)
  pr_features: np.ndarray | None = None
  pr_order: np.ndarray | None = None

  def update(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    """images: uint8 [n, H, W, C], this process's share; labels: int [n], the classes
    the images were drawn for; indices: int [n], their global positions."""
    features, probs = self.evaluator.features(images)
    features, probs = np.asarray(features, np.float32), np.asarray(probs, np.float32)
    order = np.asarray(indices, np.int64).reshape(-1)
    n = len(features)
    if len(order) != n or len(np.asarray(labels).reshape(-1)) != n:
      raise ValueError(f"Accumulator.update: {n} images, {len(np.asarray(labels))} labels "
                       f"and {len(order)} indices.")
    if self.stats is None:
      self.stats = metrics.GaussianStats(features.shape[1])
      self.pr_features, self.pr_order = features[:0], order[:0]
    self.stats.update(features)
    self.probs.append(probs)
    self.labels.append(np.asarray(labels, np.int64).reshape(-1))
    self.order.append(order)
    # Keep the pr_max_points earliest images (by index) seen so far.
    k = self.evaluator.pr_max_points
    if len(self.pr_order) >= k and n and order.min() > self.pr_order.max():
      return
    pr_features = np.concatenate([self.pr_features, features])
    pr_order = np.concatenate([self.pr_order, order])
    keep = np.sort(np.argsort(pr_order, kind="stable")[:k])
    self.pr_features, self.pr_order = pr_features[keep], pr_order[keep]

  def local_part(self) -> Partial:
    """This process's images only."""
    if self.stats is None:
      return Partial.empty(self.evaluator.reference_stats.dim)
    return Partial(self.stats, np.concatenate(self.probs), np.concatenate(self.labels),
                   np.concatenate(self.order), self.pr_features, self.pr_order)

  def result(self) -> Scores:
    """The scores of all processes' images (`Evaluator.score`). Collective: every
    process must call it."""
    part = reduce_across_processes(self.local_part(), self.evaluator.pr_max_points)
    repeated = part.order[1:][np.diff(part.order) == 0]
    if len(repeated):
      raise ValueError(f"Accumulator: sample index {repeated[0]} "
                       "was given more than once; each process must pass only its own share "
                       "of the images.")
    return self.evaluator.score(part.stats, part.probs, part.labels, part.pr_features)


METRICS = ("fid", "is_mean", "precision", "recall", "accuracy")


@dataclasses.dataclass
class Scores:
  """The metrics of one set of images, with bootstrap standard errors.

  ``values``: each of METRICS and its standard error ``{metric}_se`` (NaN when there is
  no bootstrap, or no classifier for the score and accuracy). ``replicates``: metric ->
  float64 [B], the metric of each resampled set; the draws depend only on the sample
  count, so two sets of the same size (two weights of a sweep, with the same seeds) have
  paired replicates and the spread of their differences is the error of the difference.
  """
  values: dict[str, float]
  replicates: dict[str, np.ndarray]


class Evaluator:
  """FID against ``reference_stats``, precision/recall against ``reference_features``.

  ``score_splits``: the score's contiguous splits (1 = the whole set; see
  `metrics.inception_score`). ``bootstrap``: replicates behind each standard error
  (0 = none).
  """

  def __init__(self, features: FeatureFn, reference_stats: metrics.GaussianStats,
               reference_features: np.ndarray, pr_k: int, pr_max_points: int,
               score_splits: int = 1, bootstrap: int = 0):
    self.features = features
    self.reference_stats = reference_stats
    self.reference_features = reference_features[:pr_max_points]
    self.pr_k, self.pr_max_points = pr_k, pr_max_points
    self.score_splits, self.bootstrap = score_splits, bootstrap
    self._frechet: metrics.FrechetReference | None = None
    self.floor: dict[str, float | str] = {}  # metrics, counts and the splits named

  def accumulator(self) -> Accumulator:
    return Accumulator(self)

  def score(self, stats: metrics.GaussianStats, probs: np.ndarray, labels: np.ndarray,
            pr_features: np.ndarray) -> Scores:
    """The metrics of a set: ``stats`` of all its features, ``probs`` [n, K] and
    ``labels`` [n] of all its samples in index order, ``pr_features`` [m, D] of its first
    m <= pr_max_points samples."""
    # Without a classifier head (the FID-only Inception weights) there is no score and
    # no accuracy: NaN, never a number from something else.
    has_classes = probs.shape[1] > 0
    correct = np.argmax(probs, axis=1) == labels if has_classes else None
    # Both sets equally large: precision and recall depend on the sample sizes.
    n = min(len(pr_features), len(self.reference_features))
    fake_in_real, real_in_fake = metrics.manifold_membership(
        self.reference_features[:n], pr_features[:n], k=self.pr_k)
    values = dict(fid=metrics.fid(stats, self.reference_stats),
                  is_mean=(metrics.inception_score(probs, self.score_splits) if has_classes
                           else math.nan),
                  precision=float(fake_in_real.mean()), recall=float(real_in_fake.mean()),
                  accuracy=float(correct.mean()) if has_classes else math.nan)
    replicates = self._replicates(values["fid"], stats.count, probs, correct, pr_features,
                                  fake_in_real, real_in_fake) if self.bootstrap else {}
    for name in METRICS:
      values[f"{name}_se"] = (metrics.standard_error(replicates[name]) if name in replicates
                              else math.nan)
    return Scores(values, replicates)

  def _replicates(self, fid: float, count: int, probs: np.ndarray, correct: np.ndarray | None,
                  pr_features: np.ndarray, fake_in_real: np.ndarray,
                  real_in_fake: np.ndarray) -> dict[str, np.ndarray]:
    """Bootstrap replicates of each metric (B = self.bootstrap).

    FID resamples the samples whose features are held (the first pr_max_points); with
    fewer held than drawn its spread is scaled by sqrt(held / count), the 1/sqrt(n) law
    of a smooth function of the moments. Precision and recall resample the points tested
    against a manifold, holding the manifolds' radii fixed, so they leave out the
    radii's own sampling error.
    """
    if self._frechet is None:
      self._frechet = metrics.FrechetReference(self.reference_stats.mean,
                                               self.reference_stats.cov)
    draws = lambda size: metrics.bootstrap_draws(size, self.bootstrap)
    fid_reps = metrics.fid_replicates(pr_features, draws(len(pr_features)), self._frechet)
    if len(pr_features) < count:
      fid_reps = fid + (fid_reps - fid_reps.mean()) * math.sqrt(len(pr_features) / count)
    out = dict(fid=fid_reps,
               precision=metrics.mean_replicates(fake_in_real, draws(len(fake_in_real))),
               recall=metrics.mean_replicates(real_in_fake, draws(len(real_in_fake))))
    if correct is not None:
      out["is_mean"] = metrics.score_replicates(probs, draws(len(probs)), self.score_splits)
      out["accuracy"] = metrics.mean_replicates(correct, draws(len(correct)))
    return out

  def evaluate(self, images: np.ndarray, labels: np.ndarray, chunk: int = 1000) -> Scores:
    """All metrics of images every process holds whole (e.g. real ones). Each process
    featurizes its contiguous share; collective."""
    lo, hi = multihost.process_share(len(images))
    acc = self.accumulator()
    for start in range(lo, hi, chunk):
      stop = min(start + chunk, hi)
      acc.update(images[start:stop], labels[start:stop], np.arange(start, stop))
    return acc.result()
