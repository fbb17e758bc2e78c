"""Algorithm 1 of the paper: the joint conditional/unconditional eps-prediction loss."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from cfgdiff import schedule

Array = jnp.ndarray
# denoise(z [B,H,W,C], logsnr [B], label [B], dropout_rng) -> eps [B,H,W,C]
Denoiser = Callable[[Array, Array, Array, Array], Array]


def drop_labels(rng: Array, labels: Array, p_uncond: float, num_classes: int) -> Array:
  """Replaces each label by the null token ``num_classes`` with probability ``p_uncond``."""
  drop = jax.random.uniform(rng, labels.shape) < p_uncond
  return jnp.where(drop, num_classes, labels)


def noise_batch(rng: Array, images: Array, labels: Array, *, p_uncond: float,
                num_classes: int, logsnr_min: float, logsnr_max: float) -> dict[str, Array]:
  """Draws everything random about one global training batch.

  The draws depend only on ``rng`` and the global batch shape, never on how the batch
  is split across devices, so any device count sees the same numbers.

  Returns a dict with z [B,H,W,C], eps [B,H,W,C], logsnr [B] and label [B] (some null).
  """
  rng_drop, rng_u, rng_eps = jax.random.split(rng, 3)
  batch_size = images.shape[0]
  u = jax.random.uniform(rng_u, (batch_size,))
  logsnr = schedule.logsnr_from_u(u, logsnr_min, logsnr_max)
  eps = jax.random.normal(rng_eps, images.shape, images.dtype)
  return dict(z=schedule.diffuse(images, eps, logsnr), eps=eps, logsnr=logsnr,
              label=drop_labels(rng_drop, labels, p_uncond, num_classes))


def eps_loss(eps_pred: Array, eps: Array) -> Array:
  """Mean over the batch of the per-example mean squared error ||eps_pred - eps||^2 / D."""
  return jnp.mean(jnp.square(eps_pred.astype(jnp.float32) - eps))
