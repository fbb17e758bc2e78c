"""Samplers against mathematics: exact denoisers for Gaussian data and a Gaussian mixture,
an independent float64 ODE solve of guided DDIM, guidance options, and one compile per sweep."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from cfgdiff import configs, guidance, samplers, schedule

N = 4000
MU = np.array([0.5, -1.0, 0.2, 1.0])
STD = np.array([0.3, 1.0, 0.6, 1.5])


def gaussian_eps(z, l, label):
  """Exact eps = E[eps | z_l] for x ~ N(MU, diag(STD^2)), images of shape (2, 2, 1)."""
  del label
  mu, s2 = jnp.asarray(MU).reshape(2, 2, 1), jnp.asarray(STD**2).reshape(2, 2, 1)
  a, sg = schedule.alpha_sigma(l[:, None, None, None])
  x_mean = mu + a * s2 / (a * a * s2 + sg * sg) * (z - a * mu)
  return (z - a * x_mean) / sg


MIX_MEANS, MIX_STD = (-1.0, 1.0), 0.5


def mixture_eps(z, l, label, xp=jnp):
  """Exact eps for two equiprobable classes x|c ~ N(m_c, 0.5^2); label 2 is unconditional."""
  a, sg = schedule.alpha_sigma(l) if xp is jnp else (
      np.sqrt(1 / (1 + np.exp(-l))), np.sqrt(1 / (1 + np.exp(l))))
  if xp is jnp:
    a, sg, label = a[:, None, None, None], sg[:, None, None, None], label[:, None, None, None]
  s2, var = MIX_STD**2, a * a * MIX_STD**2 + sg * sg
  means = [m + a * s2 / var * (z - a * m) for m in MIX_MEANS]
  logits = [-(z - a * m) ** 2 / (2 * var) for m in MIX_MEANS]
  p1 = 1 / (1 + xp.exp(logits[0] - logits[1]))  # p(c=1 | z_l)
  x_mean = xp.where(label == 2, (1 - p1) * means[0] + p1 * means[1],
                    xp.where(label == 0, means[0], means[1]))
  return (z - a * x_mean) / sg


def run(eps_fn, name, steps, labels, w, shape, null, options=None, fused=False, seed=0):
  spec = samplers.SamplerSpec(name, steps, fused=fused)
  keys = samplers.example_keys(seed, jnp.arange(labels.shape[0]))
  guide = guidance.classifier_free(eps_fn, null, fused)
  fn = jax.jit(lambda k, y, w, o: samplers.sample(guide, k, y, w, shape, spec, o))
  x, nfe = fn(keys, labels, w, options or samplers.GuidanceOptions.create(v=0.0, clip_x=False))
  return np.asarray(x).reshape(labels.shape[0], -1), int(nfe)


@pytest.mark.parametrize("name, steps, tol", [("ancestral", 256, 0.04), ("ddim", 50, 0.07),
                                              ("dpmpp_2m", 20, 0.05)])
def test_gaussian_data_is_reproduced(name, steps, tol):
  """DDIM, first order, runs about 5% narrow at 50 steps; the others are within 2-4%."""
  labels, w = jnp.zeros(N, jnp.int32), jnp.zeros(N)
  x, nfe = run(gaussian_eps, name, steps, labels, w, (2, 2, 1), 1)
  assert nfe == samplers.network_evaluations(name, steps) == 2 * steps
  np.testing.assert_allclose(x.mean(0), MU, atol=4 * STD.max() / np.sqrt(N))
  np.testing.assert_allclose(x.std(0), STD, rtol=tol)


def test_too_few_ancestral_steps_are_detectably_worse():
  """The tolerance above can fail: 8 ancestral steps shrink the spread visibly."""
  x, _ = run(gaussian_eps, "ancestral", 8, jnp.zeros(N, jnp.int32), jnp.zeros(N), (2, 2, 1), 1)
  assert np.max(np.abs(x.std(0) / STD - 1)) > 0.1


def _tilted_moments(w):
  """Mean and P(x > 0) of p(x | c=1) p(c=1 | x)^w, by quadrature."""
  xs = np.linspace(-6, 6, 200_001)
  p1, p0 = (np.exp(-(xs - m) ** 2 / (2 * MIX_STD**2)) for m in (1.0, -1.0))
  density = p1 * (p1 / (p0 + p1)) ** w
  density /= density.sum()
  return float((xs * density).sum()), float(density[xs > 0].sum())


def test_mixture_w0_is_the_conditional_and_w_minus_1_the_unconditional():
  labels = jnp.ones(N, jnp.int32)
  x, _ = run(mixture_eps, "ancestral", 256, labels, jnp.zeros(N), (1, 1, 1), 2)
  mean, purity = _tilted_moments(0.0)
  assert abs(x.mean() - mean) < 0.03 and abs(x.std() - MIX_STD) < 0.03
  assert abs((x > 0).mean() - purity) < 0.01
  x, _ = run(mixture_eps, "ancestral", 256, labels, -jnp.ones(N), (1, 1, 1), 2)
  assert abs(x.mean()) < 0.06 and abs((x > 0).mean() - 0.5) < 0.03


def _guided_ode_reference(z1, w, steps):
  """Independent float64 solution of the guided probability-flow ODE.

  With y = z / alpha and rho = sigma / alpha = exp(-l / 2), DDIM's ODE is
  dy / d log(rho) = rho * eps~(alpha y, l): integrated here by scipy's RK45.
  """
  grid = np.asarray(samplers.logsnr_grid(steps), np.float64)
  l_start, l_end = grid[0], grid[-1]
  y0 = z1 / np.sqrt(1 / (1 + np.exp(-l_start)))

  def rhs(log_rho, y):
    l = -2 * log_rho
    a = np.sqrt(1 / (1 + np.exp(-l)))
    z = a * y
    e_c, e_u = mixture_eps(z, l, 1, np), mixture_eps(z, l, 2, np)
    return np.exp(log_rho) * ((1 + w) * e_c - w * e_u)

  sol = solve_ivp(rhs, (-l_start / 2, -l_end / 2), y0, rtol=1e-9, atol=1e-9)
  y = sol.y[:, -1]
  a = np.sqrt(1 / (1 + np.exp(-l_end)))
  z = a * y
  e = (1 + w) * mixture_eps(z, l_end, 1, np) - w * mixture_eps(z, l_end, 2, np)
  return (z - np.sqrt(1 / (1 + np.exp(l_end))) * e) / a


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_guided_mixture_moves_as_the_tilted_density_predicts(w):
  labels = jnp.ones(N, jnp.int32)
  base, _ = run(mixture_eps, "ddim", 200, labels, jnp.zeros(N), (1, 1, 1), 2)
  x, _ = run(mixture_eps, "ddim", 200, labels, jnp.full(N, w), (1, 1, 1), 2)
  x_anc, _ = run(mixture_eps, "ancestral", 256, labels, jnp.full(N, w), (1, 1, 1), 2)
  mean0, purity0 = _tilted_moments(0.0)
  mean_w, purity_w = _tilted_moments(w)
  # The tilted density moves mass away from the other class: so must guidance, at least
  # as far (guidance is known to overshoot the tilted density, never to undershoot it).
  for samples in (x, x_anc):
    assert samples.mean() > mean_w > mean0
    assert (samples > 0).mean() >= purity_w > purity0
  assert x.mean() > base.mean() + 0.05
  # Per sample, DDIM is a discretisation of the guided ODE solved independently here.
  keys = samplers.example_keys(0, jnp.arange(200))
  z1 = np.asarray(jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), (1, 1, 1)))(
      keys), np.float64).ravel()
  reference = _guided_ode_reference(z1, w, 200)
  np.testing.assert_allclose(x[:200, 0], reference, atol=0.03)


@pytest.fixture(scope="module")
def tiny_unet():
  from cfgdiff import build
  from tests import tiny_config
  config = tiny_config.get_config()
  model = build.make_model(config)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros(1),
                      jnp.zeros(1, jnp.int32))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape),
                        params)
  eps_fn = lambda z, l, y: model.apply(params, z, l, y)
  return eps_fn, config.data.num_classes


def test_fused_equals_two_pass(tiny_unet):
  eps_fn, nc = tiny_unet
  labels, w = jnp.arange(6) % nc, jnp.linspace(-1, 4, 6)
  # Thresholding keeps an untrained network's trajectory in data range, so the
  # tolerance is in data units.
  opts = samplers.GuidanceOptions.create(threshold=0.99)
  a, _ = run(eps_fn, "ddim", 6, labels, w, (8, 8, 1), nc, opts, fused=True)
  b, _ = run(eps_fn, "ddim", 6, labels, w, (8, 8, 1), nc, opts, fused=False)
  assert np.abs(a).max() <= 1.0 + 1e-6 and np.std(a) > 0.05
  np.testing.assert_allclose(a, b, atol=1e-4)


def test_guidance_interval_skips_unconditional_evaluations(tiny_unet):
  eps_fn, nc = tiny_unet
  labels, w, steps = jnp.arange(4) % nc, jnp.full(4, 2.0), 10
  grid = -2 * np.log(np.tan(  # the schedule, written out independently
      (np.arctan(np.exp(10.0)) - np.arctan(np.exp(-10.0))) * (1 - np.arange(steps) / steps)
      + np.arctan(np.exp(-10.0))))
  lo, hi = -5.0, 2.0
  inside = int(np.sum((grid >= lo) & (grid <= hi)))
  assert 0 < inside < steps
  opts = lambda interval: samplers.GuidanceOptions.create(interval=interval, threshold=0.99)
  _, nfe = run(eps_fn, "ddim", steps, labels, w, (8, 8, 1), nc, opts((lo, hi)))
  assert nfe == steps + inside
  x_off, nfe_off = run(eps_fn, "ddim", steps, labels, w, (8, 8, 1), nc, opts((50.0, 60.0)))
  x_w0, _ = run(eps_fn, "ddim", steps, labels, jnp.zeros(4), (8, 8, 1), nc, opts((50.0, 60.0)))
  assert nfe_off == samplers.network_evaluations("ddim", steps, per_prediction=1) == steps
  np.testing.assert_allclose(x_off, x_w0, atol=1e-5)  # no guidance anywhere equals w = 0
  _, nfe_all = run(eps_fn, "ddim", steps, labels, w, (8, 8, 1), nc)
  assert nfe_all == 2 * steps


def test_rescale_and_threshold():
  rng = np.random.default_rng(0)
  cond, guided = rng.normal(size=(3, 4, 4, 1)), 3 * rng.normal(size=(3, 4, 4, 1))
  np.testing.assert_allclose(guidance.rescale(guided, cond, 0.0), guided, rtol=1e-6)
  out = np.asarray(guidance.rescale(guided, cond, 1.0))
  np.testing.assert_allclose(out.std(axis=(1, 2, 3)), cond.std(axis=(1, 2, 3)), rtol=1e-5)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 1)) * 3)
  np.testing.assert_array_equal(guidance.dynamic_threshold(x, 0.0), x)
  y = np.asarray(guidance.dynamic_threshold(x, 0.9))
  assert np.abs(y).max() <= 1.0 + 1e-6
  s = np.quantile(np.abs(np.asarray(x)).reshape(2, -1), 0.9, axis=1)
  np.testing.assert_allclose(y[0], np.clip(x[0], -s[0], s[0]) / s[0], rtol=1e-5)
  small = jnp.full((1, 2, 2, 1), 0.5)
  np.testing.assert_allclose(guidance.dynamic_threshold(small, 0.99), small)


def test_sweep_compiles_once(tiny_unet):
  eps_fn, nc = tiny_unet
  traces = []
  spec = samplers.SamplerSpec("dpmpp_2m", 4)

  @jax.jit
  def fn(keys, labels, w, options):
    traces.append(1)
    return samplers.sample(guidance.classifier_free(eps_fn, nc), keys, labels, w, (8, 8, 1),
                           spec, options)

  for seed, w, v in ((0, 0.0, 0.3), (1, 1.0, 0.2), (2, 4.0, 0.0)):
    keys = samplers.example_keys(seed, jnp.arange(4))
    fn(keys, jnp.array([0, 1, 2, 3]) % nc, jnp.full(4, w),
       samplers.GuidanceOptions.create(v=v, interval=(-3.0, 3.0), rescale=0.5, threshold=0.9))
  assert len(traces) == 1


def test_unknown_sampler_is_refused():
  with pytest.raises(ValueError, match="does not exist"):
    samplers.SamplerSpec("euler", 10)
  config = configs.default_config()
  config.sample.sampler = "euler"
  with pytest.raises(ValueError, match="sample.sampler.*ancestral.*ddim.*dpmpp_2m"):
    configs.validate_sample(config.sample)


def test_registry_is_what_configs_and_sample_run(monkeypatch):
  """A method added to the registry (and named in configs.SAMPLERS) is accepted by the
  configs, and its step function is the one `sample` runs: no name is handled elsewhere."""
  def hold_step(state, noise, v):
    del noise, v
    return state.z  # never moves: the output is x~ predicted from the initial noise

  monkeypatch.setitem(samplers.METHODS, "hold", samplers.Method(hold_step))
  # The configs know the names without importing JAX; samplers checks both agree at import.
  monkeypatch.setattr(configs, "SAMPLERS", (*configs.SAMPLERS, "hold"))
  config = configs.default_config()
  config.sweep.sampler = "hold"
  configs.validate_sweep(config.sweep)
  labels, w = jnp.zeros(8, jnp.int32), jnp.zeros(8)
  x, nfe = run(gaussian_eps, "hold", 5, labels, w, (2, 2, 1), 1)  # clip_x off: exact x~
  z0 = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), (2, 2, 1)))(
      samplers.example_keys(0, jnp.arange(8)))
  l_last = jnp.full((8,), samplers.logsnr_grid(5)[-1])
  expected = schedule.predict_x_from_eps(z0, gaussian_eps(z0, l_last, labels), l_last)
  np.testing.assert_allclose(x, np.asarray(expected).reshape(8, -1), rtol=1e-5, atol=1e-6)
  assert nfe == samplers.network_evaluations("hold", 5)


@pytest.mark.parametrize("name", list(samplers.METHODS))
def test_declared_network_evaluations_are_what_sample_counts(name):
  labels = jnp.zeros(2, jnp.int32)
  _, nfe = run(gaussian_eps, name, 3, labels, jnp.ones(2), (2, 2, 1), 1)
  assert nfe == samplers.network_evaluations(name, 3)
