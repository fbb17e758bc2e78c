"""The log-SNR math against closed forms and brute-force Gaussian conditioning."""

import numpy as np
import pytest

from cfgdiff import schedule


def test_endpoints_and_inverse():
  np.testing.assert_allclose(schedule.logsnr_from_u(0.0), 20.0, rtol=1e-4)
  np.testing.assert_allclose(schedule.logsnr_from_u(1.0), -20.0, rtol=1e-4)
  u = np.linspace(0.01, 0.99, 50)
  np.testing.assert_allclose(schedule.u_from_logsnr(schedule.logsnr_from_u(u)), u, atol=1e-5)
  assert np.all(np.diff(schedule.logsnr_from_u(u)) < 0), "l must fall as u grows"


def test_logsnr_density_matches_histogram_and_integrates_to_one():
  u = np.random.default_rng(0).uniform(size=2_000_000)
  l = np.asarray(schedule.logsnr_from_u(u))
  counts, edges = np.histogram(l, bins=80, range=(-20, 20))
  empirical = counts / (len(l) * np.diff(edges))
  centers = 0.5 * (edges[1:] + edges[:-1])
  analytic = np.asarray(schedule.logsnr_density(centers))
  np.testing.assert_allclose(empirical, analytic, rtol=0.05, atol=2e-4)
  grid = np.linspace(-20, 20, 200_001)
  assert abs(np.trapezoid(schedule.logsnr_density(grid), grid) - 1.0) < 1e-4
  assert float(schedule.logsnr_density(25.0)) == 0.0


def test_variance_preserving():
  l = np.linspace(-20, 20, 101)
  alpha, sigma = schedule.alpha_sigma(l)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.log(alpha**2 / sigma**2), l, atol=1e-3)


@pytest.mark.parametrize("l, l_next", [(-3.0, 1.0), (0.5, 0.7), (-15.0, -12.0), (4.0, 10.0)])
def test_posterior_equals_gaussian_conditioning(l, l_next):
  """q(z_l' | z_l, x) from the joint Gaussian of (z_l', z_l) given x, in float64 numpy."""
  s2 = lambda lam: 1.0 / (1.0 + np.exp(lam))  # sigma^2 = sigmoid(-l)
  a = lambda lam: np.sqrt(1.0 / (1.0 + np.exp(-lam)))  # alpha = sqrt(sigmoid(l))
  # Marginals z = a x + s eps, and z_l = (a_l / a_l') z_l' + noise of the forward step.
  cov_cross = (a(l) / a(l_next)) * s2(l_next)  # Cov(z_l', z_l)
  x, z = 0.3, -1.1
  mean_ref = a(l_next) * x + cov_cross / s2(l) * (z - a(l) * x)
  var_ref = s2(l_next) - cov_cross**2 / s2(l)
  mean, var = schedule.posterior(np.array([z]), np.array([x]), np.array([l]),
                                 np.array([l_next]))
  np.testing.assert_allclose(mean, [mean_ref], rtol=1e-5)
  np.testing.assert_allclose(var, [var_ref], rtol=1e-4)
  forward_ref = s2(l) - (a(l) / a(l_next))**2 * s2(l_next)
  np.testing.assert_allclose(np.exp(schedule.forward_log_variance(l, l_next)), forward_ref,
                             rtol=1e-4)


def test_sampler_variance_interpolates_in_log_space():
  l, l_next = -2.0, 1.0
  post = schedule.posterior_log_variance(l, l_next)
  fwd = schedule.forward_log_variance(l, l_next)
  np.testing.assert_allclose(schedule.sampler_log_variance(l, l_next, 0.0), post, rtol=1e-6)
  np.testing.assert_allclose(schedule.sampler_log_variance(l, l_next, 1.0), fwd, rtol=1e-6)
  np.testing.assert_allclose(schedule.sampler_log_variance(l, l_next, 0.3),
                             0.3 * fwd + 0.7 * post, rtol=1e-6)
  assert fwd > post  # sigma_l^2 > sigma_l'^2, so the forward step is the wider one


def test_eps_and_x_predictions_invert_diffuse():
  rng = np.random.default_rng(1)
  x, eps = rng.normal(size=(3, 4, 4, 1)), rng.normal(size=(3, 4, 4, 1))
  l = np.array([-5.0, 0.0, 5.0])
  z = schedule.diffuse(x, eps, l)
  np.testing.assert_allclose(schedule.predict_x_from_eps(z, eps, l), x, atol=2e-4)
  np.testing.assert_allclose(schedule.predict_eps_from_x(z, x, l), eps, atol=2e-4)
