"""The metrics as pure NumPy functions of features and class probabilities.

Statistics are float64 throughout: FID differences between guidance weights can be a
fraction of a unit, and float32 sums over 50k 2048-d features lose more than that.
"""

from __future__ import annotations

import dataclasses
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


def inception_score(probs: np.ndarray, num_splits: int = 10,
                    seed: int = 0) -> tuple[float, float]:
  """(mean, std) over ``num_splits`` shuffled splits of exp(E_x KL(p(y|x) || p(y))).

  ``probs`` [N, K] are class probabilities (rows sum to 1).
  """
  probs = np.asarray(probs, np.float64)
  probs = probs[np.random.default_rng(seed).permutation(len(probs))]
  scores = []
  for part in np.array_split(probs, num_splits):
    marginal = part.mean(axis=0, keepdims=True)
    kl = np.sum(part * (np.log(np.clip(part, 1e-30, None)) -
                        np.log(np.clip(marginal, 1e-30, None))), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


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


def _fraction_covered(queries: np.ndarray, centres: np.ndarray, radii: np.ndarray,
                      block: int) -> float:
  covered = 0
  for start in range(0, len(queries), block):
    d = _pairwise_sq_dists(queries[start:start + block], centres)
    covered += int(np.sum(np.any(d <= radii[None, :], axis=1)))
  return covered / len(queries)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3,
                     block: int = 1024) -> tuple[float, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019).

  Each set's manifold is the union of balls around its points reaching their k-th
  nearest neighbour. Precision: the fraction of ``fake`` [N, D] inside the real
  manifold; recall: the fraction of ``real`` [M, D] inside the fake manifold.
  """
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  if min(len(real), len(fake)) <= k:
    raise ValueError(f"precision/recall with k={k} needs more than {k} points per set.")
  precision = _fraction_covered(fake, real, _kth_neighbour_radii(real, k, block), block)
  recall = _fraction_covered(real, fake, _kth_neighbour_radii(fake, k, block), block)
  return precision, recall


def class_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of samples whose most probable class is the class they were drawn for."""
  return float(np.mean(np.argmax(probs, axis=1) == np.asarray(labels)))
