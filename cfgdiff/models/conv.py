"""A convolution whose kernel gradient runs as matrix products on CPU.

XLA:CPU computes the kernel gradient of a convolution as another convolution that
treats the batch as the contracted feature axis, after transposing both operands; at
the U-Net's shapes that ran at 20-40 GFLOP/s against 65-80 for the forward pass, and
it was half of a training step (BENCHMARKS.md). Here the kernel gradient is one matrix
product per kernel tap, ``dW[i, j] = x^T @ shift_ij(dy)`` contracted over batch and
pixels, which XLA:CPU runs at matmul speed without the transposes.

``conv_general_dilated`` has the signature of ``lax.conv_general_dilated`` and is meant
for ``flax.linen.Conv(conv_general_dilated=...)``: parameters, names and the forward
result are unchanged. The forward pass and the input gradient stay XLA's own; on TPU
and GPU (``lax.platform_dependent``) so does the kernel gradient.

Which of the two kernel gradients makes the faster training step depends on the CPU (on
an AMD Zen 3 the taps won on both networks in BENCHMARKS.md; on an Intel AVX-512 CPU they
lose on the Fashion-MNIST default), so ``conv_general_dilated(taps=False)`` keeps XLA's
and training (train.kernel_gradient="auto") times the step both ways.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
_NHWC = ("NHWC", "HWIO", "NHWC")
# Below this many input channels each tap's product is nearly a matrix-vector product,
# slower than XLA's kernel gradient (the first, 1-channel layer: 0.6 vs 0.3 ms at batch 8).
MIN_INPUT_CHANNELS = 16


def _native(x: Array, kernel: Array, padding: tuple[tuple[int, int], ...]) -> Array:
  return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC)


def kernel_grad_by_taps(x: Array, dy: Array, kernel_shape: Sequence[int],
                        padding: tuple[tuple[int, int], ...]) -> Array:
  """d(sum(dy * conv(x, W))) / dW, [kh, kw, C_in, C_out], as kh * kw matrix products.

  x: [B, H, W, C_in]; dy: [B, H', W', C_out], the output gradient of a stride-1,
  undilated NHWC convolution with explicit ``padding`` ((lo, hi) per spatial axis).
  y[p] = sum_t x[p + t - lo] W[t], so dW[t] = sum_q x[q] dy[q - t + lo]: x stays in
  place and dy, zero-padded, is sliced once per tap t.
  """
  kh, kw = kernel_shape[0], kernel_shape[1]
  (lo_h, _), (lo_w, _) = padding
  height, width = x.shape[1], x.shape[2]
  # Pad dy so that index q + k - 1 - t of the padded array is dy[q - t + lo] (lax.pad
  # takes negative padding, which crops, when the output is larger than the input).
  pad_h = (kh - 1 - lo_h, height + lo_h - dy.shape[1], 0)
  pad_w = (kw - 1 - lo_w, width + lo_w - dy.shape[2], 0)
  dy_padded = lax.pad(dy, jnp.zeros((), dy.dtype), ((0, 0, 0), pad_h, pad_w, (0, 0, 0)))
  taps = []
  for i in range(kh):
    for j in range(kw):
      shifted = dy_padded[:, kh - 1 - i:kh - 1 - i + height, kw - 1 - j:kw - 1 - j + width]
      taps.append(jnp.einsum("bhwc,bhwo->co", x, shifted))
  return jnp.stack(taps).reshape(tuple(kernel_shape)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x: Array, kernel: Array, padding: tuple[tuple[int, int], ...]) -> Array:
  return _native(x, kernel, padding)


def _conv_fwd(x, kernel, padding):
  return _native(x, kernel, padding), (x, kernel)


def _conv_bwd(padding, residuals, dy):
  x, kernel = residuals

  def native_grads(x, kernel, dy):
    return jax.vjp(lambda x, k: _native(x, k, padding), x, kernel)[1](dy)

  def cpu_grads(x, kernel, dy):
    # The input gradient from XLA (as fast as the forward pass on CPU), the kernel's by taps.
    _, input_vjp = jax.vjp(lambda x: _native(x, kernel, padding), x)
    return input_vjp(dy)[0], kernel_grad_by_taps(x, dy, kernel.shape, padding)

  return lax.platform_dependent(x, kernel, dy, cpu=cpu_grads, default=native_grads)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None, *, taps: bool = True) -> Array:
  """``lax.conv_general_dilated`` with the kernel gradient of ``kernel_grad_by_taps``.

  Only 2-D, stride-1, undilated, ungrouped NHWC/HWIO convolutions with at least
  MIN_INPUT_CHANNELS input channels take the new path (all of the U-Net's but the
  first), unless ``taps`` is False; anything else is passed to
  ``lax.conv_general_dilated`` unchanged.
  """
  ones = (1,) * (lhs.ndim - 2)
  simple = (taps and lhs.ndim == 4 and tuple(window_strides) == ones
            and tuple(lhs_dilation or ones) == ones and tuple(rhs_dilation or ones) == ones
            and rhs.ndim == 4 and rhs.shape[2] >= MIN_INPUT_CHANNELS
            and feature_group_count == 1 and batch_group_count == 1 and precision is None
            and preferred_element_type is None
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if not simple:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], ones, padding)
  return _conv(lhs, rhs, tuple((int(lo), int(hi)) for lo, hi in padding))
