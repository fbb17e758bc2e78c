"""The noisy classifier of classifier guidance: ADM's EncoderUNetModel (Dhariwal & Nichol
2021; openai/guided-diffusion unet.py) with attention pooling, in this U-Net's blocks.

It is the U-Net's downsampling half and middle block, conditioned on the log-SNR like the
denoiser (no class input), then GroupNorm, SiLU and ADM's AttentionPool2d to logits.
Layout is NHWC throughout.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cfgdiff.models.unet import (
  AttentionBlock,
  GroupNorm,
  ResBlock,
  _num_groups,
  conv_layer,
  logsnr_embedding,
)

Array = jnp.ndarray


class AttentionPool(nn.Module):
  """ADM's AttentionPool2d: the mean feature, as one more token beside the H*W positions
  (each with a learned positional embedding), attends over all of them; its output,
  projected, is the result. [B,H,W,C] -> [B, out_dim]."""

  num_heads: int
  out_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)  # [B, 1 + HW, C]
    # ADM initialises it as randn / sqrt(C).
    position = self.param("positional_embedding", nn.initializers.normal(c ** -0.5),
                          (h * w + 1, c))
    x = x + position.astype(x.dtype)
    qkv = nn.DenseGeneral((3, self.num_heads, c // self.num_heads), dtype=self.dtype)(x)
    q, k, v = qkv[:, :1, 0], qkv[:, :, 1], qkv[:, :, 2]  # only the mean token's query
    y = nn.dot_product_attention(q, k, v, dtype=self.dtype, force_fp32_for_softmax=True)
    y = nn.DenseGeneral(self.out_dim, axis=(-2, -1), dtype=self.dtype)(y)  # [B, 1, out]
    return y[:, 0].astype(jnp.float32)


class NoisyClassifier(nn.Module):
  """log p(c | z_l) up to a constant: (z [B,H,W,C], logsnr [B]) -> logits [B, num_classes].

  Attributes as `UNet`'s (ch, ch_mult, num_res_blocks, attn_resolutions, head_channels,
  num_heads, dropout, dtype, kernel_grad_taps); ADM's classifier_depth is
  num_res_blocks and classifier_width is ch.
  """

  num_classes: int
  ch: int = 32
  ch_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 1
  attn_resolutions: Sequence[int] = (7,)
  head_channels: int = 32
  num_heads: int = 4
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  kernel_grad_taps: bool = True

  def _heads(self, channels: int) -> int:
    return channels // self.head_channels if self.head_channels else self.num_heads

  @nn.compact
  def __call__(self, z: Array, logsnr: Array, train: bool = False) -> Array:
    emb_dim = 4 * self.ch
    emb = logsnr_embedding(logsnr, self.ch)
    emb = nn.Dense(emb_dim, dtype=self.dtype)(emb)
    emb = nn.Dense(emb_dim, dtype=self.dtype)(nn.swish(emb))

    def block(h: Array, out_ch: int, resample: str | None = None) -> Array:
      return ResBlock(out_ch, self.dropout, resample, self.dtype,
                      self.kernel_grad_taps)(h, emb, train)

    h = conv_layer(self.ch, (3, 3), self.kernel_grad_taps, dtype=self.dtype)(z.astype(self.dtype))
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = block(h, self.ch * mult)
        if h.shape[1] in self.attn_resolutions:
          h = AttentionBlock(self._heads(h.shape[-1]), self.dtype)(h)
      if level != len(self.ch_mult) - 1:
        h = block(h, h.shape[-1], "down")

    h = block(h, h.shape[-1])
    h = AttentionBlock(self._heads(h.shape[-1]), self.dtype)(h)
    h = block(h, h.shape[-1])
    h = nn.swish(GroupNorm(_num_groups(h.shape[-1]), dtype=self.dtype)(h))
    return AttentionPool(self._heads(h.shape[-1]), self.num_classes, self.dtype)(h)


def log_prob(logits: Array, labels: Array) -> Array:
  """log p(label | z) [B] from logits [B, K] and int labels [B]."""
  return jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]


def cross_entropy(logits: Array, labels: Array) -> Array:
  """Mean over the batch of -log p(label | z): the classifier's training loss."""
  return -jnp.mean(log_prob(logits.astype(jnp.float32), labels))
