"""The metrics as pure NumPy functions of features and class probabilities.

Statistics are float64 throughout: FID differences between guidance weights can be a
fraction of a unit, and float32 sums over 50k 2048-d features lose more than that.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass
class GaussianStats:
  """Streaming mean and covariance of feature vectors (float64 sums).

  ``update`` takes features [B, D] in any number of batches; ``mean``/``cov`` equal the
  one-shot ``np.mean``/``np.cov`` of all of them.
  """
  dim: int
  count: int = 0
  total: np.ndarray | None = None
  outer: np.ndarray | None = None

  def __post_init__(self):
    if self.total is None:
      self.total = np.zeros(self.dim, np.float64)
      self.outer = np.zeros((self.dim, self.dim), np.float64)

  def update(self, features: np.ndarray) -> None:
    f = np.asarray(features, np.float64).reshape(-1, self.dim)
    self.count += len(f)
    self.total += f.sum(axis=0)
    self.outer += f.T @ f

  @property
  def mean(self) -> np.ndarray:
    return self.total / self.count

  @property
  def cov(self) -> np.ndarray:
    if self.count < 2:
      raise ValueError("a covariance needs at least 2 feature vectors.")
    mu = self.mean
    return (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)

  @classmethod
  def combine(cls, parts: Sequence[GaussianStats]) -> GaussianStats:
    """The statistics of all the parts' features together: the float64 sums added in
    order (so every process that combines the same parts gets the same bits)."""
    if not parts:
      raise ValueError("combine needs at least one GaussianStats.")
    out = cls(parts[0].dim)
    for part in parts:
      if part.dim != out.dim:
        raise ValueError(f"cannot combine {part.dim}-d and {out.dim}-d statistics.")
      out.count += part.count
      out.total += part.total
      out.outer += part.outer
    return out

  def save(self, path: str) -> None:
    np.savez(path, count=self.count, total=self.total, outer=self.outer)

  @classmethod
  def load(cls, path: str) -> GaussianStats:
    with np.load(path) as f:
      return cls(dim=f["total"].shape[0], count=int(f["count"]), total=f["total"],
                  outer=f["outer"])


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a positive semi-definite matrix (negative rounding -> 0)."""
  values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray,
                     cov2: np.ndarray) -> float:
  """||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2)).

  tr((C1 C2)^(1/2)) is computed as tr((S C2 S)^(1/2)) with S = C1^(1/2): the same
  eigenvalues, but of a symmetric PSD matrix, so eigh is exact where the general
  sqrtm of pytorch-fid can return complex parts and needs an epsilon fix.
  """
  mu1, mu2, cov1, cov2 = (np.asarray(a, np.float64) for a in (mu1, mu2, cov1, cov2))
  s1 = _sqrt_psd(cov1)
  middle = np.linalg.eigvalsh(s1 @ cov2 @ s1)
  trace_sqrt = np.sum(np.sqrt(np.clip(middle, 0.0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)


def fid(stats_a: GaussianStats, stats_b: GaussianStats) -> float:
  return frechet_distance(stats_a.mean, stats_a.cov, stats_b.mean, stats_b.cov)


class FrechetReference:
  """The Frechet distance to one fixed Gaussian (the reference statistics), with its
  square root computed once: each further distance costs one D x D eigendecomposition,
  which is what makes hundreds of bootstrap replicates affordable."""

  def __init__(self, mean: np.ndarray, cov: np.ndarray):
    self.mean = np.asarray(mean, np.float64)
    self.cov = np.asarray(cov, np.float64)
    self.sqrt_cov = _sqrt_psd(self.cov)
    self.trace = float(np.trace(self.cov))

  def distance(self, mean: np.ndarray, cov: np.ndarray) -> float:
    """frechet_distance(mean, cov, reference mean, reference cov)."""
    middle = np.linalg.eigvalsh(self.sqrt_cov @ cov @ self.sqrt_cov)
    diff = mean - self.mean
    return float(diff @ diff + np.trace(cov) + self.trace
                 - 2.0 * np.sum(np.sqrt(np.clip(middle, 0.0, None))))

  def distance_from_factor(self, mean: np.ndarray, factor: np.ndarray) -> float:
    """`distance` for cov = factor^T factor (factor [k, D]). With k < D it needs only a
    k x k eigendecomposition: the nonzero eigenvalues of S C S = (F S)^T (F S) are those
    of (F S)(F S)^T. (A few samples of 2048-d Inception features: milliseconds, not the
    seconds of a 2048 x 2048 one.)"""
    if len(factor) >= factor.shape[1]:
      return self.distance(mean, factor.T @ factor)
    projected = factor @ self.sqrt_cov
    middle = np.linalg.eigvalsh(projected @ projected.T)
    diff = mean - self.mean
    return float(diff @ diff + np.sum(factor * factor) + self.trace
                 - 2.0 * np.sum(np.sqrt(np.clip(middle, 0.0, None))))


# ---------------------------------------------------------------------------------------
# Bootstrap. Every cell of a sweep draws the same seeds and labels, so resampling the
# same sample positions in every cell (the same `bootstrap_draws`) gives replicates that
# are paired across cells: the spread of (replicate at w1 - replicate at w2) is the
# standard error of the difference, much smaller than either cell's own error.
# ---------------------------------------------------------------------------------------
def bootstrap_draws(n: int, num_replicates: int, seed: int = 0) -> np.ndarray:
  """int [num_replicates, n]: sample positions drawn with replacement, a function of
  (n, num_replicates, seed) only."""
  return np.random.default_rng([seed, n]).integers(0, n, size=(num_replicates, n))


def fid_replicates(features: np.ndarray, draws: np.ndarray,
                   reference: FrechetReference) -> np.ndarray:
  """float64 [B]: the FID to ``reference`` of each resampled set features[draws[b]]
  (features [n, D]), from the distinct samples drawn weighted by their multiplicity."""
  x = np.asarray(features, np.float64)
  n = len(x)
  out = np.empty(len(draws))
  for b, draw in enumerate(draws):
    weight = np.bincount(draw, minlength=n).astype(np.float64)
    mean = weight @ x / n
    drawn = weight > 0
    # cov = factor^T factor, the unbiased covariance of the resampled set.
    factor = (x[drawn] - mean) * np.sqrt(weight[drawn] / (n - 1))[:, None]
    out[b] = reference.distance_from_factor(mean, factor)
  return out


def score_replicates(probs: np.ndarray, draws: np.ndarray, num_splits: int = 1) -> np.ndarray:
  """float64 [B]: `inception_score` of each resampled set probs[draws[b]]."""
  probs = np.asarray(probs, np.float64)
  return np.array([inception_score(probs[np.sort(draw)], num_splits) for draw in draws])


def mean_replicates(values: np.ndarray, draws: np.ndarray) -> np.ndarray:
  """float64 [B]: the mean of each resampled set values[draws[b]] (values [n])."""
  return np.asarray(values, np.float64)[draws].mean(axis=1)


def standard_error(replicates: np.ndarray) -> float:
  """The bootstrap standard error: the replicates' standard deviation (NaN for < 2)."""
  replicates = np.asarray(replicates, np.float64)
  return float(np.std(replicates, ddof=1)) if len(replicates) > 1 else math.nan


def inception_score(probs: np.ndarray, num_splits: int = 1) -> float:
  """exp(E_x KL(p(y|x) || p(y))), averaged over ``num_splits`` contiguous splits.

  ``probs`` [N, K] are class probabilities (rows sum to 1), in sample order. The splits
  are contiguous and unshuffled, so a class-balanced set (classes taken in turn, as the
  sweep draws them) stays balanced in every split whose size is a multiple of K, and a
  confident, correct classifier scores exactly K. One split (the default) estimates the
  marginal p(y) from all N samples; the paper's ImageNet convention is 10 splits.
  """
  probs = np.asarray(probs, np.float64)
  scores = []
  for part in np.array_split(probs, num_splits):
    marginal = part.mean(axis=0, keepdims=True)
    kl = np.sum(part * (np.log(np.clip(part, 1e-30, None)) -
                        np.log(np.clip(marginal, 1e-30, None))), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores))


def _pairwise_sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a2, b2 = np.sum(a * a, axis=1)[:, None], np.sum(b * b, axis=1)[None, :]
  return np.clip(a2 + b2 - 2.0 * a @ b.T, 0.0, None)


def _kth_neighbour_radii(points: np.ndarray, k: int, block: int) -> np.ndarray:
  """Squared distance from each point to its k-th nearest other point."""
  radii = np.empty(len(points), np.float64)
  for start in range(0, len(points), block):
    d = _pairwise_sq_dists(points[start:start + block], points)
    # Column k of the sorted row: column 0 is the point itself at distance 0.
    radii[start:start + block] = np.partition(d, k, axis=1)[:, k]
  return radii


def _covered(queries: np.ndarray, centres: np.ndarray, radii: np.ndarray,
             block: int) -> np.ndarray:
  """bool [len(queries)]: whether each query lies in some centre's ball."""
  covered = np.empty(len(queries), bool)
  for start in range(0, len(queries), block):
    d = _pairwise_sq_dists(queries[start:start + block], centres)
    covered[start:start + block] = np.any(d <= radii[None, :], axis=1)
  return covered


def manifold_membership(real: np.ndarray, fake: np.ndarray, k: int = 3,
                        block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """(bool [N]: each of ``fake`` [N, D] inside the real manifold, bool [M]: each of
  ``real`` [M, D] inside the fake manifold), a manifold being the union of balls around
  a set's points reaching their k-th nearest neighbour (Kynkaanniemi et al. 2019)."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  if min(len(real), len(fake)) <= k:
    raise ValueError(f"precision/recall with k={k} needs more than {k} points per set.")
  return (_covered(fake, real, _kth_neighbour_radii(real, k, block), block),
          _covered(real, fake, _kth_neighbour_radii(fake, k, block), block))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3,
                     block: int = 1024) -> tuple[float, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019): the fraction of ``fake``
  inside the real manifold, and of ``real`` inside the fake manifold."""
  fake_in_real, real_in_fake = manifold_membership(real, fake, k, block)
  return float(fake_in_real.mean()), float(real_in_fake.mean())


def class_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of samples whose most probable class is the class they were drawn for."""
  return float(np.mean(np.argmax(probs, axis=1) == np.asarray(labels)))
