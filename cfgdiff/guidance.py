"""Classifier-free guidance of one denoiser: eps~ = (1 + w) eps(z, c) - w eps(z, null).

``w`` is the paper's guidance weight: w = 0 is the plain conditional model, w = -1 the
unconditional one. Other tools (Imagen, diffusers) use the "guidance scale" s = 1 + w.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

Array = jnp.ndarray
# eps_fn(z [B,H,W,C], logsnr [B], label [B]) -> eps [B,H,W,C]
EpsFn = Callable[[Array, Array, Array], Array]


def combine(eps_cond: Array, eps_uncond: Array, w: Array) -> Array:
  """(1 + w) eps_cond - w eps_uncond, with ``w`` [B] broadcast per example."""
  w = w.reshape(w.shape + (1,) * (eps_cond.ndim - w.ndim))
  return eps_cond + w * (eps_cond - eps_uncond)


def cond_and_uncond(eps_fn: EpsFn, z: Array, logsnr: Array, label: Array, null_label: int,
                    fused: bool) -> tuple[Array, Array]:
  """Both evaluations: one batch of 2B when ``fused``, else two batches of B."""
  null = jnp.full_like(label, null_label)
  if fused:
    both = eps_fn(jnp.concatenate([z, z]), jnp.concatenate([logsnr, logsnr]),
                  jnp.concatenate([label, null]))
    return both[:z.shape[0]], both[z.shape[0]:]
  return eps_fn(z, logsnr, label), eps_fn(z, logsnr, null)


def rescale(eps_guided: Array, eps_cond: Array, phi: Array) -> Array:
  """CFG rescale (Lin et al. 2023): match the guided prediction's per-example std to the
  conditional one's, blended by ``phi`` in [0, 1] (0 leaves it unchanged)."""
  axes = tuple(range(1, eps_guided.ndim))
  ratio = jnp.std(eps_cond, axis=axes, keepdims=True) / (
      jnp.std(eps_guided, axis=axes, keepdims=True) + 1e-12)
  return phi * (eps_guided * ratio) + (1.0 - phi) * eps_guided


def dynamic_threshold(x: Array, percentile: Array) -> Array:
  """Imagen's dynamic thresholding (Saharia et al. 2022) of x-predictions [B,...].

  s = max(1, the ``percentile`` quantile of |x| per example); x <- clip(x, -s, s) / s.
  ``percentile`` = 0 disables it (s becomes 1 and x is clipped to [-1, 1] only when
  ``percentile`` > 0).
  """
  axes = tuple(range(1, x.ndim))
  flat = jnp.abs(x).reshape(x.shape[0], -1)
  s = jnp.maximum(jnp.quantile(flat, jnp.clip(percentile, 0.0, 1.0), axis=1), 1.0)
  s = s.reshape((-1,) + (1,) * len(axes))
  return jnp.where(percentile > 0, jnp.clip(x, -s, s) / s, x)
