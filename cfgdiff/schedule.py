"""Log-SNR diffusion math (Ho & Salimans 2022, section 2), as pure functions.

Conventions: ``logsnr`` is l = log(alpha^2 / sigma^2), variance preserving, so
alpha^2 = sigmoid(l) and sigma^2 = sigmoid(-l). Larger l is cleaner. ``u`` in
[0, 1] is the "time": u = 0 is the clean end (l_max), u = 1 the noisy end (l_min).
All functions broadcast over arrays and work in jax.numpy.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import nn

Array = jnp.ndarray

LOGSNR_MIN = -20.0
LOGSNR_MAX = 20.0


def _schedule_coefficients(logsnr_min: float, logsnr_max: float) -> tuple[Array, Array]:
  """(a, b) of l(u) = -2 log tan(a u + b), so that l(0) = l_max and l(1) = l_min."""
  b = jnp.arctan(jnp.exp(-0.5 * logsnr_max))
  a = jnp.arctan(jnp.exp(-0.5 * logsnr_min)) - b
  return a, b


def logsnr_from_u(u: Array, logsnr_min: float = LOGSNR_MIN,
                  logsnr_max: float = LOGSNR_MAX) -> Array:
  """Truncated hyperbolic-secant schedule: l = -2 log tan(a u + b), u in [0, 1]."""
  a, b = _schedule_coefficients(logsnr_min, logsnr_max)
  return -2.0 * jnp.log(jnp.tan(a * u + b))


def u_from_logsnr(logsnr: Array, logsnr_min: float = LOGSNR_MIN,
                  logsnr_max: float = LOGSNR_MAX) -> Array:
  """Inverse of `logsnr_from_u`."""
  a, b = _schedule_coefficients(logsnr_min, logsnr_max)
  return (jnp.arctan(jnp.exp(-0.5 * logsnr)) - b) / a


def logsnr_density(logsnr: Array, logsnr_min: float = LOGSNR_MIN,
                   logsnr_max: float = LOGSNR_MAX) -> Array:
  """Density of l when u ~ U[0, 1]: |du/dl| = sech(l / 2) / (4 a) on [l_min, l_max]."""
  a, _ = _schedule_coefficients(logsnr_min, logsnr_max)
  inside = (logsnr >= logsnr_min) & (logsnr <= logsnr_max)
  return jnp.where(inside, 1.0 / (4.0 * a * jnp.cosh(0.5 * logsnr)), 0.0)


def alpha_sigma(logsnr: Array) -> tuple[Array, Array]:
  """Signal and noise scales: alpha = sqrt(sigmoid(l)), sigma = sqrt(sigmoid(-l))."""
  return jnp.sqrt(nn.sigmoid(logsnr)), jnp.sqrt(nn.sigmoid(-logsnr))


def diffuse(x: Array, eps: Array, logsnr: Array) -> Array:
  """Forward process z_l = alpha_l x + sigma_l eps; ``logsnr`` has shape [B], x and eps [B, ...]."""
  alpha, sigma = alpha_sigma(_expand_to(logsnr, x))
  return alpha * x + sigma * eps


def predict_x_from_eps(z: Array, eps: Array, logsnr: Array) -> Array:
  """x = (z - sigma eps) / alpha; ``logsnr`` has shape [B] (or broadcasts to z)."""
  alpha, sigma = alpha_sigma(_expand_to(logsnr, z))
  return (z - sigma * eps) / alpha


def predict_eps_from_x(z: Array, x: Array, logsnr: Array) -> Array:
  """eps = (z - alpha x) / sigma."""
  alpha, sigma = alpha_sigma(_expand_to(logsnr, z))
  return (z - alpha * x) / sigma


def posterior(z: Array, x: Array, logsnr: Array, logsnr_next: Array) -> tuple[Array, Array]:
  """Mean and variance of q(z_{l'} | z_l, x) for l < l' (l' = ``logsnr_next`` is cleaner).

  With r = exp(l - l'): mean = r (alpha_l' / alpha_l) z_l + (1 - r) alpha_l' x and
  variance = (1 - r) sigma_l'^2. The variance has the shape of ``logsnr``.
  """
  alpha, _ = alpha_sigma(_expand_to(logsnr, z))
  alpha_next, _ = alpha_sigma(_expand_to(logsnr_next, z))
  r = jnp.exp(_expand_to(logsnr - logsnr_next, z))
  mean = r * (alpha_next / alpha) * z + (1.0 - r) * alpha_next * x
  return mean, jnp.exp(posterior_log_variance(logsnr, logsnr_next))


def posterior_log_variance(logsnr: Array, logsnr_next: Array) -> Array:
  """log sigma~^2 = log(1 - r) + log sigma_l'^2, computed without cancellation."""
  return jnp.log(-jnp.expm1(logsnr - logsnr_next)) + nn.log_sigmoid(-logsnr_next)


def forward_log_variance(logsnr: Array, logsnr_next: Array) -> Array:
  """log sigma_{l|l'}^2 = log(1 - r) + log sigma_l^2: variance of q(z_l | z_l')."""
  return jnp.log(-jnp.expm1(logsnr - logsnr_next)) + nn.log_sigmoid(-logsnr)


def sampler_log_variance(logsnr: Array, logsnr_next: Array, v: float | Array) -> Array:
  """Algorithm 2's step variance (sigma~^2)^(1-v) (sigma_{l|l'}^2)^v, in log space."""
  return (v * forward_log_variance(logsnr, logsnr_next)
          + (1.0 - v) * posterior_log_variance(logsnr, logsnr_next))


def _expand_to(per_example: Array, like: Array) -> Array:
  """Reshapes a [B] array to [B, 1, ..., 1] so it broadcasts against ``like`` [B, ...]."""
  per_example = jnp.asarray(per_example)
  if per_example.ndim == 0:
    return per_example
  return per_example.reshape(per_example.shape + (1,) * (like.ndim - per_example.ndim))
