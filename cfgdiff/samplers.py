"""Guided samplers: the paper's ancestral sampler (Algorithm 2), DDIM and DPM-Solver++(2M).

`METHODS` is the one registry of samplers: a name maps to a step function and the number
of guided predictions it makes per step, and the configs accept exactly its names. All
share one grid and one guided prediction, made by a `guidance.Guide` (classifier-free,
classifier or autoguidance). The network is evaluated at
l_1 < ... < l_T (log-SNRs of u evenly spaced from 1 down to 1/T, so l_1 = l_min) and the
last step returns x~. The loop is a `lax.scan` inside one jit; the guidance weight,
labels, noise keys and every option are traced, so a whole w sweep compiles once.

Noise for example i comes from its own key (fold_in(seed, sample_id)), so an image
depends on its seed, label and w only: not on the batch it shares or the device count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections

from cfgdiff import configs, guidance, schedule

Array = jnp.ndarray


class StepState(NamedTuple):
  """What a step function sees at step t (arrays [B,H,W,C] unless noted).

  z: the current latent at log-SNR ``logsnr``; x, eps: the guided prediction there.
  logsnr, logsnr_next: scalars, the step goes from the first to the second (increasing).
  x_prev, h_prev: the previous step's x~ and its step in lambda = logsnr / 2 (scalar), for
    multistep methods; at t = 0 they are zeros and one.
  t: scalar int32 step index.
  """

  z: Array
  x: Array
  eps: Array
  logsnr: Array
  logsnr_next: Array
  x_prev: Array
  h_prev: Array
  t: Array


def ancestral_step(s: StepState, noise: Callable[[], Array], v: Array) -> Array:
  """The paper's Algorithm 2: draw z_{t+1} from the posterior with variance
  (sigma~^2)^(1-v) (sigma_{t|t+1}^2)^v."""
  mean, _ = schedule.posterior(s.z, s.x, s.logsnr, s.logsnr_next)
  std = jnp.exp(0.5 * schedule.sampler_log_variance(s.logsnr, s.logsnr_next, v))
  return mean + std * noise()


def ddim_step(s: StepState, noise: Callable[[], Array], v: Array) -> Array:
  """DDIM (Song et al. 2021), deterministic: z_{t+1} = alpha_{t+1} x~ + sigma_{t+1} eps~."""
  del noise, v
  alpha_next, sigma_next = schedule.alpha_sigma(s.logsnr_next)
  return alpha_next * s.x + sigma_next * s.eps


def dpmpp_2m_step(s: StepState, noise: Callable[[], Array], v: Array) -> Array:
  """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in lambda = logsnr / 2: second order
  from the previous step's x~, first order at t = 0."""
  del noise, v
  alpha_next, sigma_next = schedule.alpha_sigma(s.logsnr_next)
  _, sigma = schedule.alpha_sigma(s.logsnr)
  h = 0.5 * (s.logsnr_next - s.logsnr)
  r = s.h_prev / h
  d = jnp.where(s.t == 0, s.x, (1.0 + 0.5 / r) * s.x - (0.5 / r) * s.x_prev)
  return (sigma_next / sigma) * s.z - alpha_next * jnp.expm1(-h) * d


@dataclasses.dataclass(frozen=True)
class Method:
  """A sampler: its step function (state, noise thunk, v) -> z_{t+1}, and how many guided
  predictions it makes per step (each costs the guide's evaluations where guidance is on,
  one where it is off). `sample` makes one per step, before the step function; the
  tests check every registered method's declared count against what `sample` counts."""

  step: Callable[[StepState, Callable[[], Array], Array], Array]
  predictions_per_step: int = 1


METHODS: dict[str, Method] = {
    "ancestral": Method(ancestral_step),
    "ddim": Method(ddim_step),
    "dpmpp_2m": Method(dpmpp_2m_step),
}


if tuple(METHODS) != configs.SAMPLERS:  # the configs name them without importing jax
  raise ImportError(f"samplers.METHODS {tuple(METHODS)} != configs.SAMPLERS {configs.SAMPLERS}")


def names() -> tuple[str, ...]:
  """The sampler names the configs accept."""
  return tuple(METHODS)


def network_evaluations(name: str, num_steps: int, per_prediction: int = 2) -> int:
  """Network forward passes per sample of a whole run, guided at every step by a guide
  of ``per_prediction`` evaluations (`guidance.Guide.evaluations`; 1: unguided)."""
  return METHODS[name].predictions_per_step * num_steps * per_prediction


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """What fixes the compiled program (static): the method and the number of steps."""

  name: str = "ancestral"
  num_steps: int = 256
  fused: bool = False  # both guidance evaluations as one 2B batch (else two B batches)
  logsnr_min: float = schedule.LOGSNR_MIN
  logsnr_max: float = schedule.LOGSNR_MAX

  def __post_init__(self):
    if self.name not in METHODS:
      raise ValueError(f"sampler {self.name!r} does not exist; choose one of {names()}.")
    if self.num_steps < 1:
      raise ValueError(f"num_steps={self.num_steps} must be >= 1.")


@flax.struct.dataclass
class GuidanceOptions:
  """Traced options: changing any of them does not recompile.

  v: ancestral variance interpolation (paper: 0.3 at 64x64, 0.2 at 128x128).
  interval: [lo, hi] log-SNR range where guidance is applied (Kynkaanniemi et al. 2024);
    outside it only the guide's unguided prediction is made (the conditional network).
  rescale: CFG rescale factor phi in [0, 1] (Lin et al. 2023); 0 is off.
  threshold: dynamic-thresholding percentile (Saharia et al. 2022); 0 is off.
  clip_x: clip x~ to the data range [-1, 1] at every step, as the authors' code
    (diffusion_distillation) and ADM (clip_denoised) do. Needed in practice: at
    l_min = -20, alpha = 4.5e-5 turns a small eps error into a huge x~ that the first
    ancestral step carries into z.
  """

  v: Array = 0.3
  interval: Array = (-jnp.inf, jnp.inf)
  rescale: Array = 0.0
  threshold: Array = 0.0
  clip_x: Array = True

  @classmethod
  def create(cls, v=0.3, interval=(-jnp.inf, jnp.inf), rescale=0.0, threshold=0.0,
             clip_x=True):
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return cls(v=f32(v), interval=f32(interval), rescale=f32(rescale), threshold=f32(threshold),
               clip_x=jnp.asarray(clip_x, bool))

  @classmethod
  def from_config(cls, sample: ml_collections.ConfigDict) -> GuidanceOptions:
    """The options config.sample holds (`configs.TRACED_SAMPLE_OPTIONS`)."""
    return cls.create(**{o.field: (tuple(sample[o.key]) if isinstance(sample[o.key], list)
                                   else sample[o.key]) for o in configs.TRACED_SAMPLE_OPTIONS})


def logsnr_grid(num_steps: int, logsnr_min: float = schedule.LOGSNR_MIN,
                logsnr_max: float = schedule.LOGSNR_MAX) -> Array:
  """[T] increasing log-SNRs l(u) at u = 1, 1 - 1/T, ..., 1/T."""
  u = 1.0 - jnp.arange(num_steps, dtype=jnp.float32) / num_steps
  return schedule.logsnr_from_u(u, logsnr_min, logsnr_max)


def sample(guide: guidance.Guide, keys: Array, labels: Array, w: Array,
           image_shape: tuple[int, ...], spec: SamplerSpec,
           options: GuidanceOptions) -> tuple[Array, Array]:
  """Draws one batch of guided samples.

  Args:
    guide: how a guided prediction is made (`guidance.classifier_free(eps_fn, null)` is
      the paper's; `guidance.classifier`, `guidance.autoguidance` beside it).
    keys: [B, 2] uint32 per-example PRNG keys. labels: [B] int class labels.
    w: [B] guidance weights (the classifier scale for classifier guidance).
    image_shape: (H, W, C).
  Returns:
    x [B,H,W,C] float32 (the final x~, in data units) and the number of network
    forward passes per example (int32 scalar).
  """
  batch = labels.shape[0]
  grid = logsnr_grid(spec.num_steps, spec.logsnr_min, spec.logsnr_max)
  draw = jax.vmap(lambda k, t: jax.random.normal(jax.random.fold_in(k, t), image_shape),
                  in_axes=(0, None))

  def predict(z, logsnr):
    """Guided (x~, eps~) at a scalar log-SNR, and the network evaluations it cost."""
    l = jnp.full((batch,), logsnr)

    def guided(_):
      eps, eps_ref = guide.guided(z, l, labels, w)
      return guidance.rescale(eps, eps_ref, options.rescale), jnp.int32(guide.evaluations)

    def unguided(_):
      return guide.unguided(z, l, labels), jnp.int32(1)

    lo, hi = options.interval[0], options.interval[1]
    eps, cost = jax.lax.cond((logsnr >= lo) & (logsnr <= hi), guided, unguided, None)
    x = schedule.predict_x_from_eps(z, eps, l)
    x = jnp.where(options.clip_x, jnp.clip(x, -1.0, 1.0), x)
    x = guidance.dynamic_threshold(x, options.threshold)
    return x, schedule.predict_eps_from_x(z, x, l), cost

  method = METHODS[spec.name]

  def step(carry, inputs):
    z, x_prev, h_prev, nfe = carry
    t, logsnr, logsnr_next = inputs
    x, eps, cost = predict(z, logsnr)
    state = StepState(z, x, eps, logsnr, logsnr_next, x_prev, h_prev, t)
    z_next = method.step(state, lambda: draw(keys, t + 1), options.v)
    h = 0.5 * (logsnr_next - logsnr)  # step in lambda = log(alpha / sigma)
    return (z_next, x, h, nfe + cost), None

  z = draw(keys, 0)
  carry = (z, jnp.zeros_like(z), jnp.ones(()), jnp.int32(0))
  inputs = (jnp.arange(spec.num_steps - 1), grid[:-1], grid[1:])
  (z, _, _, nfe), _ = jax.lax.scan(step, carry, inputs)
  x, _, cost = predict(z, grid[-1])
  return x, nfe + cost


def example_keys(seed: int | Array, sample_ids: Array) -> Array:
  """[B, 2] keys: example ``i`` of a run gets fold_in(PRNGKey(seed), i)."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(seed), sample_ids)
