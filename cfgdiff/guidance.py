"""Guidance: how a guided eps-prediction is made from one or more networks.

Classifier-free guidance (the paper): eps~ = (1 + w) eps(z, c) - w eps(z, null). ``w`` is
the paper's guidance weight: w = 0 is the plain conditional model, w = -1 the
unconditional one. Other tools (Imagen, diffusers) use the "guidance scale" s = 1 + w.
Beside it, for comparison on the same samplers: classifier guidance (a noisy classifier's
gradient) and autoguidance (a weaker model of the same data). Each is a `Guide`; the
samplers know nothing else about guidance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cfgdiff import configs

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


# log_prob_fn(z [B,H,W,C], logsnr [B], label [B]) -> log p(label | z) [B]
LogProbFn = Callable[[Array, Array, Array], Array]


class Guide(NamedTuple):
  """One guidance method, as the samplers use it (`samplers.sample`).

  guided(z [B,H,W,C], logsnr [B], labels [B], w [B]) -> (eps~, eps_ref): the guided
    prediction at weight ``w``, and the unguided one CFG rescale matches its spread to.
  unguided(z, logsnr, labels) -> eps: the prediction outside the guidance interval.
  evaluations: forward passes of a network (denoiser or classifier) per guided
    prediction; unguided ones cost one.
  backward_passes: backward passes through a network per guided prediction (classifier
    guidance's gradient), which cost about two forward passes each.
  """

  guided: Callable[[Array, Array, Array, Array], tuple[Array, Array]]
  unguided: Callable[[Array, Array, Array], Array]
  evaluations: int
  backward_passes: int = 0


METHODS = configs.GUIDANCE_METHODS  # declared there: the configs must not import jax


def classifier_free(eps_fn: EpsFn, null_label: int, fused: bool = False) -> Guide:
  """The paper's guidance: eps~ = (1 + w) eps(z, c) - w eps(z, null)."""

  def guided(z, logsnr, labels, w):
    eps_c, eps_u = cond_and_uncond(eps_fn, z, logsnr, labels, null_label, fused)
    return combine(eps_c, eps_u, w), eps_c

  return Guide(guided, eps_fn, evaluations=2)


def classifier_gradient(log_prob_fn: LogProbFn, z: Array, logsnr: Array,
                        labels: Array) -> Array:
  """grad_z log p(label | z) [B,H,W,C], each example's own (the log-probabilities of a
  batch are independent, so the gradient of their sum is the per-example one)."""
  return jax.grad(lambda x: jnp.sum(log_prob_fn(x, logsnr, labels)))(z)


def classifier(eps_fn: EpsFn, log_prob_fn: LogProbFn, null_label: int | None) -> Guide:
  """Classifier guidance (Dhariwal & Nichol 2021, their eq. 14 for eps-models):
  eps~ = eps(z, c') - w sigma grad_z log p(c | z), with ``w`` the classifier scale s.

  ``null_label``: c' is the null token, the unconditional model (None: c' = c, the
  conditional model, as ADM-G). With exact models, CFG at weight w equals this at scale
  w + 1 on the unconditional model and at scale w on the conditional one.
  """

  def denoise(z, logsnr, labels):
    return eps_fn(z, logsnr, labels if null_label is None else jnp.full_like(labels, null_label))

  def guided(z, logsnr, labels, w):
    eps = denoise(z, logsnr, labels)
    sigma = jnp.sqrt(jax.nn.sigmoid(-logsnr)).reshape((-1,) + (1,) * (z.ndim - 1))
    grad = classifier_gradient(log_prob_fn, z, logsnr, labels).astype(eps.dtype)
    return eps - w.reshape(sigma.shape) * sigma * grad, eps

  return Guide(guided, denoise, evaluations=2, backward_passes=1)


def autoguidance(strong_eps_fn: EpsFn, weak_eps_fn: EpsFn) -> Guide:
  """Autoguidance (Karras et al. 2024): eps~ = eps_weak + (1 + w) (eps_strong - eps_weak),
  both for the same label; w = 0 is the strong model alone."""

  def guided(z, logsnr, labels, w):
    strong, weak = strong_eps_fn(z, logsnr, labels), weak_eps_fn(z, logsnr, labels)
    return combine(strong, weak, w), strong

  return Guide(guided, strong_eps_fn, evaluations=2)
