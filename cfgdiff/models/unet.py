"""ADM-style U-Net (Dhariwal & Nichol 2021) conditioned on log-SNR and a class label.

The class embedding has ``num_classes + 1`` rows; row ``num_classes`` is the learned
null token of classifier-free guidance, so the unconditional model is the same network
called with label ``num_classes``. Layout is NHWC throughout.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cfgdiff.models import conv

Array = jnp.ndarray

# Output layers start at zero so every residual branch is the identity at init (ADM).
_zeros = nn.initializers.zeros


def conv_layer(features: int, kernel_size: tuple[int, int], taps: bool, **kwargs) -> nn.Conv:
  """flax's Conv (same parameters and names); with ``taps``, conv.py's kernel gradient
  by tap products on CPU instead of XLA's own."""
  return nn.Conv(features, kernel_size, conv_general_dilated=functools.partial(
      conv.conv_general_dilated, taps=taps), **kwargs)


def logsnr_embedding(logsnr: Array, dim: int, max_period: float = 10000.0) -> Array:
  """Sinusoidal embedding [B, dim] of the log-SNR [B].

  l is first mapped to t = arctan(exp(-l / 2)) / (pi / 2) in [0, 1] (the cosine-schedule
  time, as in diffusion_distillation) and scaled by 1000 so the usual frequencies apply.
  """
  t = jnp.arctan(jnp.exp(-0.5 * jnp.clip(logsnr, -20.0, 20.0))) / (0.5 * jnp.pi)
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * t[:, None].astype(jnp.float32) * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _num_groups(channels: int, preferred: int = 32) -> int:
  """GroupNorm groups: 32 as in ADM, or the largest divisor of ``channels`` below it."""
  return math.gcd(channels, preferred)


class GroupNorm(nn.Module):
  """Group normalisation [B, ..., C] -> same shape, with flax ``nn.GroupNorm``'s parameters
  (``scale``, ``bias``), epsilon and result.

  The statistics are reduced over the spatial axes per channel first ([B, C], with the
  channel axis contiguous in NHWC) and only then over the channels of each group. flax's
  reshape to [..., groups, C / groups] reduces across that axis instead, which XLA:CPU runs
  4-6x slower at 28x28 (BENCHMARKS.md).
  """

  num_groups: int
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    x = x.astype(jnp.float32)  # statistics in float32 also under bf16 compute
    spatial = tuple(range(1, x.ndim - 1))

    def per_group(channel_stat: Array) -> Array:  # [B, C] -> group average, [B, C]
      grouped = channel_stat.reshape(channel_stat.shape[0], self.num_groups, -1).mean(-1)
      return jnp.repeat(grouped, channels // self.num_groups, axis=-1)

    mean = per_group(jnp.mean(x, spatial))
    var = jnp.maximum(per_group(jnp.mean(jnp.square(x), spatial)) - jnp.square(mean), 0.0)
    gain = jax.lax.rsqrt(var + self.epsilon) * scale
    offset = bias - mean * gain
    shape = (x.shape[0],) + (1,) * len(spatial) + (channels,)
    return (x * gain.reshape(shape) + offset.reshape(shape)).astype(self.dtype)


class ResBlock(nn.Module):
  """Residual block with scale-shift norm; ``resample`` 'down'/'up' makes it BigGAN-style."""

  out_ch: int
  dropout: float = 0.0
  resample: str | None = None  # None, "up" or "down"
  dtype: jnp.dtype = jnp.float32
  kernel_grad_taps: bool = True  # see UNet

  @nn.compact
  def __call__(self, x: Array, emb: Array, train: bool) -> Array:
    in_ch = x.shape[-1]
    h = nn.swish(GroupNorm(_num_groups(in_ch), dtype=self.dtype)(x))
    if self.resample is not None:
      h, x = _resample(h, self.resample), _resample(x, self.resample)
    h = conv_layer(self.out_ch, (3, 3), self.kernel_grad_taps, dtype=self.dtype)(h)

    scale_shift = nn.Dense(2 * self.out_ch, dtype=self.dtype)(nn.swish(emb))
    scale, shift = jnp.split(scale_shift[:, None, None, :], 2, axis=-1)
    h = GroupNorm(_num_groups(self.out_ch), dtype=self.dtype)(h) * (1.0 + scale) + shift
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.swish(h))
    h = conv_layer(self.out_ch, (3, 3), self.kernel_grad_taps, kernel_init=_zeros,
                   dtype=self.dtype)(h)

    if in_ch != self.out_ch:
      x = conv_layer(self.out_ch, (1, 1), self.kernel_grad_taps, dtype=self.dtype)(x)
    return x + h


def _resample(x: Array, mode: str) -> Array:
  """2x average-pool down or nearest-neighbour up (ADM's resblock_updown without conv)."""
  if mode == "down":
    return nn.avg_pool(x, (2, 2), strides=(2, 2))
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


class AttentionBlock(nn.Module):
  """Multi-head self-attention over spatial positions, residual, zero-initialised output."""

  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    y = GroupNorm(_num_groups(c), dtype=self.dtype)(x).reshape(b, h * w, c)
    qkv = nn.DenseGeneral((3, self.num_heads, c // self.num_heads), dtype=self.dtype)(y)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # Softmax in float32 whatever the compute dtype, as ADM's QKVAttention does.
    y = nn.dot_product_attention(q, k, v, dtype=self.dtype,
                                 force_fp32_for_softmax=True)  # [B, HW, heads, c/heads]
    y = nn.DenseGeneral(c, axis=(-2, -1), kernel_init=_zeros, dtype=self.dtype)(y)
    return x + y.reshape(b, h, w, c)


class UNet(nn.Module):
  """eps-prediction U-Net: (z [B,H,W,C], logsnr [B], label [B] int) -> eps [B,H,W,C].

  Attributes:
    num_classes: number of real classes; label ``num_classes`` is the null token.
    ch: base channel count. ch_mult: multiplier per resolution level.
    num_res_blocks: residual blocks per level. attn_resolutions: feature-map sizes
      (in pixels) that get self-attention. head_channels: channels per attention head
      (ADM's num_head_channels); num_heads is used when head_channels is 0.
    dropout: dropout rate inside residual blocks. dtype: compute dtype (params stay f32).
    kernel_grad_taps: the convolutions' kernel gradient on CPU is conv.py's tap
      products (True) or XLA's own (False): the same function and parameters, a speed
      choice that depends on the CPU (train.kernel_gradient).
  """

  num_classes: int
  ch: int = 64
  ch_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (7,)
  head_channels: int = 64
  num_heads: int = 4
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  kernel_grad_taps: bool = True

  def _heads(self, channels: int) -> int:
    return channels // self.head_channels if self.head_channels else self.num_heads

  @nn.compact
  def __call__(self, z: Array, logsnr: Array, label: Array, train: bool = False) -> Array:
    emb_dim = 4 * self.ch
    emb = logsnr_embedding(logsnr, self.ch)
    emb = nn.Dense(emb_dim, dtype=self.dtype)(emb)
    emb = nn.Dense(emb_dim, dtype=self.dtype)(nn.swish(emb))
    emb = emb + nn.Embed(self.num_classes + 1, emb_dim, name="class_embed")(label).astype(
        emb.dtype)

    def block(h: Array, out_ch: int, resample: str | None = None) -> Array:
      return ResBlock(out_ch, self.dropout, resample, self.dtype,
                      self.kernel_grad_taps)(h, emb, train)

    def maybe_attend(h: Array) -> Array:
      if h.shape[1] in self.attn_resolutions:
        h = AttentionBlock(self._heads(h.shape[-1]), self.dtype)(h)
      return h

    h = conv_layer(self.ch, (3, 3), self.kernel_grad_taps, dtype=self.dtype)(z.astype(self.dtype))
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = maybe_attend(block(h, self.ch * mult))
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        h = block(h, h.shape[-1], "down")
        skips.append(h)

    h = block(h, h.shape[-1])
    h = AttentionBlock(self._heads(h.shape[-1]), self.dtype)(h)
    h = block(h, h.shape[-1])

    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = maybe_attend(block(jnp.concatenate([h, skips.pop()], axis=-1), self.ch * mult))
      if level != 0:
        h = block(h, h.shape[-1], "up")
    assert not skips

    h = nn.swish(GroupNorm(_num_groups(h.shape[-1]), dtype=self.dtype)(h))
    out = conv_layer(z.shape[-1], (3, 3), self.kernel_grad_taps, kernel_init=_zeros,
                     dtype=self.dtype)(h)
    return out.astype(jnp.float32)
