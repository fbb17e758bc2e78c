"""FID, IS, precision/recall and accuracy against closed forms and independent references."""

import numpy as np
import pytest
import scipy.linalg

from cfgdiff.evaluation import metrics


def _random_spd(rng, dim):
  a = rng.normal(size=(dim, dim))
  return a @ a.T / dim + 0.1 * np.eye(dim)


def test_frechet_distance_of_commuting_gaussians_is_closed_form():
  # Diagonal covariances commute: tr((C1 C2)^(1/2)) = sum sqrt(a_i b_i).
  a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  expected = 1.0 + 4.0 + np.sum(a) + np.sum(b) - 2 * np.sum(np.sqrt(a * b))
  assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)
  assert metrics.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_on_non_commuting_covariances():
  rng = np.random.default_rng(0)
  c1, c2 = _random_spd(rng, 64), _random_spd(rng, 64)
  mu1, mu2 = rng.normal(size=64), rng.normal(size=64)
  reference = (np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2)
               - 2 * np.trace(scipy.linalg.sqrtm(c1 @ c2)).real)
  assert metrics.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(reference, rel=1e-9)


def test_fid_of_samples_converges_to_the_gaussians_distance():
  rng = np.random.default_rng(1)
  c1, c2 = _random_spd(rng, 4), _random_spd(rng, 4)
  mu1, mu2 = np.zeros(4), np.full(4, 0.5)
  exact = metrics.frechet_distance(mu1, c1, mu2, c2)
  a, b = metrics.GaussianStats(4), metrics.GaussianStats(4)
  a.update(rng.multivariate_normal(mu1, c1, 200_000))
  b.update(rng.multivariate_normal(mu2, c2, 200_000))
  assert metrics.fid(a, b) == pytest.approx(exact, rel=0.02)


def test_streaming_statistics_equal_one_shot(tmp_path):
  rng = np.random.default_rng(2)
  features = (rng.normal(size=(1000, 16)) * 50 + 1000).astype(np.float32)
  stats = metrics.GaussianStats(16)
  for chunk in np.array_split(features, 7):
    stats.update(chunk)
  np.testing.assert_allclose(stats.mean, features.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(stats.cov, np.cov(features.astype(np.float64), rowvar=False),
                             rtol=1e-9, atol=1e-9)
  stats.save(tmp_path / "s.npz")
  loaded = metrics.GaussianStats.load(tmp_path / "s.npz")
  assert loaded.count == 1000 and metrics.fid(stats, loaded) == pytest.approx(0, abs=1e-6)


def test_combined_statistics_equal_those_of_all_features():
  rng = np.random.default_rng(3)
  features = (rng.normal(size=(500, 8)) * 30 + 200).astype(np.float32)
  whole = metrics.GaussianStats(8)
  whole.update(features)
  parts = []
  for chunk in np.split(features, [0, 120, 121, 400]):  # one part empty, one of one row
    parts.append(metrics.GaussianStats(8))
    parts[-1].update(chunk)
  combined = metrics.GaussianStats.combine(parts)
  assert combined.count == 500 and combined is not parts[0]
  np.testing.assert_allclose(combined.mean, whole.mean, rtol=1e-13)
  np.testing.assert_allclose(combined.cov, whole.cov, rtol=1e-9, atol=1e-9)
  assert parts[0].count == 0, "combine must not change its inputs"
  with pytest.raises(ValueError, match="4-d and 8-d"):
    metrics.GaussianStats.combine([whole, metrics.GaussianStats(4)])


def test_inception_score_of_one_hot_and_uniform_predictions():
  k = 10
  one_hot = np.eye(k)[np.arange(200) % k]  # confident, correct, classes in turn: IS = K
  assert metrics.inception_score(one_hot) == pytest.approx(k, rel=1e-12)
  # Contiguous splits of a multiple of K stay balanced (a shuffle would give ~7.9).
  assert metrics.inception_score(one_hot, num_splits=10) == pytest.approx(k, rel=1e-12)
  assert metrics.inception_score(np.full((5000, k), 1.0 / k)) == pytest.approx(1.0)
  # All mass on one class: confident but no diversity, IS = 1.
  assert metrics.inception_score(np.eye(k)[np.zeros(1000, int)]) == pytest.approx(1.0)


def test_inception_score_of_a_two_class_closed_form():
  # Half the samples say [p, 1-p], half [1-p, p]: the marginal is uniform, so
  # log IS = log 2 + p log p + (1-p) log(1-p).
  p = 0.8
  probs = np.array([[p, 1 - p], [1 - p, p]] * 50)
  expected = np.exp(np.log(2) + p * np.log(p) + (1 - p) * np.log(1 - p))
  assert metrics.inception_score(probs) == pytest.approx(expected, rel=1e-12)


def test_frechet_reference_equals_the_frechet_distance():
  rng = np.random.default_rng(4)
  c1, c2 = _random_spd(rng, 16), _random_spd(rng, 16)
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  reference = metrics.FrechetReference(mu2, c2)
  assert reference.distance(mu1, c1) == pytest.approx(
      metrics.frechet_distance(mu1, c1, mu2, c2), rel=1e-10)


@pytest.mark.parametrize("n, dim", [(60, 5), (8, 20)])  # the D x D path and the k x k one
def test_fid_replicates_are_the_fid_of_each_resampled_set(n, dim):
  rng = np.random.default_rng(5)
  x = rng.normal(size=(n, dim)) + 1.0
  reference_stats = metrics.GaussianStats(dim)
  reference_stats.update(rng.normal(size=(500, dim)) @ rng.normal(size=(dim, dim)))
  reference = metrics.FrechetReference(reference_stats.mean, reference_stats.cov)
  draws = np.stack([np.arange(n), rng.integers(0, n, n)])
  got = metrics.fid_replicates(x, draws, reference)
  for draw, value in zip(draws, got, strict=True):
    stats = metrics.GaussianStats(dim)
    stats.update(x[draw])
    # (rel 1e-7: with n < D the direct route takes square roots of rounding-level
    # eigenvalues of a singular covariance, which the k x k route never sees.)
    assert value == pytest.approx(metrics.fid(stats, reference_stats), rel=1e-7)


def test_bootstrap_draws_depend_only_on_the_size():
  a, b = metrics.bootstrap_draws(50, 7), metrics.bootstrap_draws(50, 7)
  np.testing.assert_array_equal(a, b)  # paired across the cells of a sweep
  assert a.shape == (7, 50) and a.min() >= 0 and a.max() < 50
  assert not np.array_equal(a, metrics.bootstrap_draws(50, 7, seed=1))


def test_bootstrap_standard_errors_match_the_sampling_spread():
  rng = np.random.default_rng(6)
  # A fraction: the binomial standard error sqrt(p (1 - p) / n).
  hits = rng.random(400) < 0.3
  error = metrics.standard_error(metrics.mean_replicates(hits, metrics.bootstrap_draws(400, 2000)))
  assert error == pytest.approx(np.sqrt(hits.mean() * (1 - hits.mean()) / 400), rel=0.1)
  # FID of 300 Gaussian samples against a known Gaussian: the bootstrap error of one set
  # against the spread of FID over 200 independent sets.
  dim, n = 4, 300
  mean, cov = np.full(dim, 0.5), np.diag([1.0, 2.0, 0.5, 1.5])
  reference = metrics.FrechetReference(np.zeros(dim), np.eye(dim))

  def sample_fid(samples):
    return reference.distance(samples.mean(0), np.cov(samples, rowvar=False))
  spread = np.std([sample_fid(rng.multivariate_normal(mean, cov, n)) for _ in range(200)])
  one_set = rng.multivariate_normal(mean, cov, n)
  error = metrics.standard_error(
      metrics.fid_replicates(one_set, metrics.bootstrap_draws(n, 400), reference))
  assert 0.7 * spread < error < 1.4 * spread


def test_paired_replicates_resolve_a_small_shift_that_unpaired_errors_hide():
  # Two sets from the same seeds, one shifted slightly: each FID has a large error, the
  # paired difference a small one, as for two guidance weights sharing their noise.
  rng = np.random.default_rng(7)
  x = rng.normal(size=(200, 3))
  y = x + 0.05
  reference = metrics.FrechetReference(np.ones(3), np.eye(3))
  draws = metrics.bootstrap_draws(200, 300)
  fx, fy = (metrics.fid_replicates(s, draws, reference) for s in (x, y))
  unpaired = np.hypot(metrics.standard_error(fx), metrics.standard_error(fy))
  paired = metrics.standard_error(fy - fx)
  assert paired < 0.2 * unpaired
  change = reference.distance(y.mean(0), np.cov(y, rowvar=False)) - reference.distance(
      x.mean(0), np.cov(x, rowvar=False))
  assert abs(change) > 2 * paired


def test_precision_recall_on_point_sets_with_known_answers():
  # Reals: a unit-spaced grid on [0, 9]^2; each ball (k = 3) has radius 1 (4 neighbours
  # at distance 1 for interior points), so it covers the square up to about 1 outside.
  grid = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0)), -1).reshape(-1, 2)
  inside = grid[:50] + 0.3  # every one within 1 of a real point
  far = np.full((50, 2), 100.0) + np.random.default_rng(0).normal(size=(50, 2))
  precision, _ = metrics.precision_recall(grid, np.concatenate([inside, far]))
  assert precision == pytest.approx(0.5)
  # Fakes covering only the lower half of the grid: recall is the covered fraction.
  # The fake balls reach 1 beyond row 4, so rows 0..5 of the real grid are covered.
  lower = grid[grid[:, 1] <= 4]
  precision, recall = metrics.precision_recall(grid, lower)
  assert precision == 1.0 and recall == pytest.approx(0.6)


def test_class_accuracy():
  probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
  assert metrics.class_accuracy(probs, np.array([0, 1, 1])) == pytest.approx(2 / 3)


def test_classifier_features_of_no_images_have_the_right_shapes():
  """A process whose devices drew none of a chunk still takes part in the reduction."""
  import jax

  from cfgdiff.evaluation import classifier
  variables = classifier.Classifier(10).init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1)))
  features, probs = classifier.ClassifierFeatures(variables, 10)(
      np.zeros((0, 28, 28, 1), np.uint8))
  assert features.shape == (0, classifier.FEATURE_DIM) and probs.shape == (0, 10)
