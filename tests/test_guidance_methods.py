"""Classifier guidance and autoguidance against mathematics, through the real samplers.

For data from a two-class Gaussian mixture the exact conditional and unconditional eps
and the exact posterior p(c | z_l) are known in closed form. With exact models
grad log p(z | c) = grad log p(z) + grad log p(c | z), so classifier-free guidance at
weight w is classifier guidance at scale w + 1 from the unconditional model and at
scale w from the conditional one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfgdiff import guidance, samplers, schedule
from cfgdiff.models import classifier as classifier_net
from tests.test_samplers import MIX_MEANS, MIX_STD, mixture_eps

N = 512
NULL = 2


def mixture_log_prob(z, l, label):
  """Exact log p(c | z_l) [B] for the mixture of `mixture_eps` (equal class priors)."""
  a, sg = schedule.alpha_sigma(l[:, None, None, None])
  var = a * a * MIX_STD**2 + sg * sg
  logits = jnp.stack([jnp.sum(-(z - a * m) ** 2 / (2 * var), axis=(1, 2, 3))
                      for m in MIX_MEANS], axis=-1)
  return classifier_net.log_prob(logits, label)


unconditional_eps = lambda z, l, y: mixture_eps(z, l, jnp.full_like(y, NULL))
GUIDES = {
    "cfg": guidance.classifier_free(mixture_eps, NULL),
    "classifier_from_uncond": guidance.classifier(mixture_eps, mixture_log_prob, NULL),
    "classifier_from_cond": guidance.classifier(mixture_eps, mixture_log_prob, None),
    "auto_weak_uncond": guidance.autoguidance(mixture_eps, unconditional_eps),
    "auto_weak_same": guidance.autoguidance(mixture_eps, mixture_eps),
}
_compiled = {}


def draw(guide: str, name: str, w: float, steps: int = 64) -> np.ndarray:
  """N samples of class 1 under GUIDES[guide] at weight w (traced: one compile per guide
  and sampler); every guide starts from the same noise."""
  if (guide, name) not in _compiled:
    spec = samplers.SamplerSpec(name, steps)
    options = samplers.GuidanceOptions.create(v=0.3, clip_x=False)
    _compiled[guide, name] = jax.jit(lambda k, y, w: samplers.sample(
        GUIDES[guide], k, y, w, (1, 1, 1), spec, options)[0])
  keys = samplers.example_keys(0, jnp.arange(N))
  x = _compiled[guide, name](keys, jnp.ones(N, jnp.int32), jnp.full(N, w))
  return np.asarray(x).ravel()


@pytest.mark.parametrize("name", ["ddim", "ancestral"])
def test_cfg_is_classifier_guidance_at_w_plus_1_unconditional_and_w_conditional(name):
  for w in (1.0, 3.0):
    cfg = draw("cfg", name, w)
    np.testing.assert_allclose(draw("classifier_from_uncond", name, w + 1), cfg, atol=5e-4)
    np.testing.assert_allclose(draw("classifier_from_cond", name, w), cfg, atol=5e-4)
    # The identity is sharp: a scale off by one moves samples far beyond that tolerance.
    off_by_one = draw("classifier_from_uncond", name, w)
    assert np.max(np.abs(off_by_one - cfg)) > 0.05


def test_autoguidance_with_the_unconditional_model_as_weak_model_is_cfg():
  """eps_weak + (1 + w)(eps_strong - eps_weak) with eps_weak the unconditional model is
  the paper's formula; with weak = strong it is the strong model alone, at any w."""
  cfg = draw("cfg", "ddim", 2.0)
  np.testing.assert_allclose(draw("auto_weak_uncond", "ddim", 2.0), cfg, atol=1e-5)
  plain = draw("cfg", "ddim", 0.0)
  np.testing.assert_allclose(draw("auto_weak_same", "ddim", 5.0), plain, atol=1e-5)
  assert np.max(np.abs(cfg - plain)) > 0.05


@pytest.fixture(scope="module")
def tiny_classifier():
  model = classifier_net.NoisyClassifier(num_classes=3, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                                         attn_resolutions=(4,), head_channels=8)
  z = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  logsnr = jnp.array([-4.0, 0.0, 2.0, 6.0])
  params = jax.jit(model.init)(jax.random.PRNGKey(1), z, logsnr)["params"]
  # Away from the zero-initialised output layers of init, so every path carries gradient.
  params = jax.tree.map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
  log_prob = jax.jit(
      lambda x, l, y: classifier_net.log_prob(model.apply({"params": params}, x, l), y))
  return log_prob, z, logsnr


def test_classifier_gradient_matches_finite_differences(tiny_classifier):
  """Directional derivatives of log p(c | z) by central differences, per example (each
  example's gradient must not leak into another's)."""
  log_prob, z, logsnr = tiny_classifier
  labels = jnp.array([0, 1, 2, 1])
  gradient = jax.jit(lambda x: guidance.classifier_gradient(log_prob, x, logsnr, labels))
  grad = gradient(z)
  assert grad.shape == z.shape and float(jnp.max(jnp.abs(grad))) > 1e-3
  h = 1e-2
  for seed in range(3):
    direction = jax.random.normal(jax.random.PRNGKey(10 + seed), z.shape)
    numeric = (log_prob(z + h * direction, logsnr, labels)
               - log_prob(z - h * direction, logsnr, labels)) / (2 * h)
    analytic = jnp.sum(grad * direction, axis=(1, 2, 3))
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2, atol=2e-3)
  # Changing one example's input leaves the others' gradients as they were.
  moved = z.at[0].add(1.0)
  other = gradient(moved)
  np.testing.assert_allclose(other[1:], grad[1:], rtol=1e-5, atol=1e-6)


def _counting(fn, counter, key):
  def counted(*args):
    jax.debug.callback(lambda: counter.__setitem__(key, counter[key] + 1))
    return fn(*args)
  return counted


@pytest.mark.parametrize("method", guidance.METHODS)
def test_declared_evaluations_are_the_network_calls_made(method):
  """Each guide's declared forward passes per guided prediction are what the sampler
  runs, counted at run time; outside the guidance interval, one."""
  calls = {"denoiser": 0, "other": 0}
  eps = _counting(mixture_eps, calls, "denoiser")
  guides = {
      "cfg": lambda: guidance.classifier_free(eps, NULL),
      "classifier": lambda: guidance.classifier(
          eps, _counting(mixture_log_prob, calls, "other"), None),
      "auto": lambda: guidance.autoguidance(
          eps, _counting(lambda z, l, y: mixture_eps(z, l, jnp.full_like(y, NULL)), calls,
                         "other")),
  }
  guide, steps = guides[method](), 5
  spec = samplers.SamplerSpec("ddim", steps)
  labels = jnp.ones(2, jnp.int32)
  keys = samplers.example_keys(0, jnp.arange(2))
  for interval, per_prediction in (((-jnp.inf, jnp.inf), guide.evaluations), ((30.0, 40.0), 1)):
    calls.update(denoiser=0, other=0)
    options = samplers.GuidanceOptions.create(interval=interval, clip_x=False)
    _, nfe = samplers.sample(guide, keys, labels, jnp.ones(2), (1, 1, 1), spec, options)
    jax.effects_barrier()
    assert calls["denoiser"] + calls["other"] == int(nfe) == samplers.network_evaluations(
        "ddim", steps, per_prediction), (calls, int(nfe))
  assert guide.backward_passes == (1 if method == "classifier" else 0)
