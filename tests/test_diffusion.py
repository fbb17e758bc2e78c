"""Algorithm 1's random draws: label dropout rate, noising, loss."""

import jax
import jax.numpy as jnp
import numpy as np

from cfgdiff import diffusion, schedule


def test_drop_labels_rate():
  labels = jnp.zeros((200_000,), jnp.int32) + 3
  for p in (0.0, 0.2, 0.5, 1.0):
    dropped = diffusion.drop_labels(jax.random.PRNGKey(0), labels, p, num_classes=10)
    frac = float(jnp.mean(dropped == 10))
    assert abs(frac - p) < 0.005, (p, frac)
    assert set(np.unique(dropped)) <= {3, 10}


def test_noise_batch_is_the_forward_process():
  images = jax.random.uniform(jax.random.PRNGKey(1), (512, 4, 4, 1), minval=-1, maxval=1)
  labels = jnp.arange(512) % 10
  out = diffusion.noise_batch(jax.random.PRNGKey(2), images, labels, p_uncond=0.1,
                              num_classes=10, logsnr_min=-20.0, logsnr_max=20.0)
  np.testing.assert_allclose(out["z"], schedule.diffuse(images, out["eps"], out["logsnr"]),
                             atol=1e-6)
  assert float(out["logsnr"].min()) >= -20.0 and float(out["logsnr"].max()) <= 20.0
  assert abs(float(out["eps"].std()) - 1.0) < 0.03
  # u is uniform, so about half the l values lie above l(0.5) = 0 (the schedule is symmetric).
  assert abs(float(jnp.mean(out["logsnr"] > 0.0)) - 0.5) < 0.06


def test_eps_loss():
  eps = jnp.ones((2, 3, 3, 1))
  assert float(diffusion.eps_loss(eps, eps)) == 0.0
  np.testing.assert_allclose(diffusion.eps_loss(eps + 2.0, eps), 4.0)
