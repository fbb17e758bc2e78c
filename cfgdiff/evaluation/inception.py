"""The FID Inception network (the 2015-12-05 TensorFlow graph) in Flax, and its features.

The architecture is the one pytorch-fid (``FIDInceptionA/C/E``) and NVIDIA's TorchScript
define, which differs from torchvision's Inception-v3 in ways that move FID: average
pools that do not count padding, a max pool in the last block, batch-norm eps 1e-3,
no batch-norm scale. Inputs are 0..255 images, resized to 299x299 with TF1's bilinear
rule (source pixel = destination pixel * in/out, no half-pixel offset) and mapped to
[-1, 1) by (x - 128) / 128, as the TF graph does.

The Inception Score uses the graph's 1008-way classifier WITHOUT its output bias:
softmax(pool3 @ W), as the original IS code (improved-gan), ADM's evaluator
(``_create_softmax_graph`` multiplies pool_3 by the MatMul weight only) and StyleGAN3's
metrics (``no_output_bias=True``) compute it.

Parameters are named after pytorch-fid's modules (``Mixed_5b/branch1x1/conv``...), so a
pytorch-fid state dict maps one to one; `inception_weights` reads and downloads them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cfgdiff.evaluation import batching

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008


class BasicConv(nn.Module):
  """Conv (no bias) -> batch norm (eps 1e-3, inference statistics) -> ReLU."""
  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel, self.strides, use_bias=False,
                padding=[(p, p) for p in self.padding], name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride=2, pad=0):
  return nn.max_pool(x, (3, 3), (stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b pools by average (padding not counted), Mixed_7c by max: a quirk of the
  2015 graph that pytorch-fid reproduces as FIDInceptionE_1 / _2."""
  max_pool: bool

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
    pooled = _max_pool_3x3(x, stride=1, pad=1) if self.max_pool else _avg_pool_3x3(x)
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Logits(nn.Module):
  """The graph's 1008-way classifier: pool3 [B, 2048] -> logits [B, 1008].

  The bias is a parameter (pytorch-fid's ``fc.bias``) but is added only with
  ``use_bias``: the Inception Score is defined without it.
  """
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_LOGITS))
    bias = self.param("bias", nn.initializers.zeros_init(), (NUM_LOGITS,))
    logits = jnp.dot(x, kernel)
    return logits + bias if self.use_bias else logits


class FIDInception(nn.Module):
  """x: float32 [B, 299, 299, 3] already in [-1, 1) -> pool_3 [B, 2048] (and, with
  ``logits``, the 1008-way logits [B, 1008], without the output bias unless
  ``output_bias``)."""
  logits: bool = False
  output_bias: bool = False

  @nn.compact
  def __call__(self, x):
    x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    if not self.logits:
      return pool3
    return pool3, Logits(self.output_bias, name="fc")(pool3)


def tf1_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] interpolation weights of TF1's resize_bilinear (align_corners=False,
  half_pixel_centers=False): output pixel j reads source position j * in / out, the
  upper neighbour clamped to the edge."""
  src = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
  low = np.floor(src).astype(int)
  high = np.minimum(low + 1, in_size - 1)
  frac = src - low
  matrix = np.zeros((out_size, in_size), np.float64)
  matrix[np.arange(out_size), low] += 1.0 - frac
  matrix[np.arange(out_size), high] += frac
  return matrix.astype(np.float32)


def preprocess(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """images [B, H, W, C] on the 0..255 scale (C = 1 or 3) -> [B, size, size, 3] in [-1, 1)."""
  images = images.astype(jnp.float32)
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  rows = jnp.asarray(tf1_bilinear_matrix(images.shape[1], size))
  cols = jnp.asarray(tf1_bilinear_matrix(images.shape[2], size))
  resized = jnp.einsum("ih,bhwc,jw->bijc", rows, images, cols,
                       precision=jax.lax.Precision.HIGHEST)
  return (resized - 128.0) / 128.0


class InceptionFeatures:
  """pool_3 features and, when the weights have the classifier, the class probabilities
  softmax(pool3 @ W) (no output bias: the Inception Score's definition) of images on the
  0..255 scale, in fixed-size jitted batches split over this process's devices.

  ``batch_size`` is rounded up to a multiple of the local device count.
  """

  def __init__(self, variables: dict, batch_size: int = 50, output_bias: bool = False):
    devices = jax.local_device_count()
    self.batch_size = -(-batch_size // devices) * devices
    self.has_logits = "fc" in variables["params"]
    model = FIDInception(logits=self.has_logits, output_bias=output_bias)
    split, replicated = batching.local_shardings(self.batch_size)
    self.variables = jax.device_put(variables, replicated)

    def apply(variables, images):
      # Full float32 passes on TPU/GPU too (their default is one bf16 pass), as the TF
      # graph that defines FID ran.
      with jax.default_matmul_precision("highest"):
        out = model.apply(variables, preprocess(images))
        if self.has_logits:
          return out[0], jax.nn.softmax(out[1])
      return out, jnp.zeros((images.shape[0], 0))
    self._apply = jax.jit(apply, in_shardings=(replicated, split), out_shardings=replicated)

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 or float [N, H, W, C] (0..255) -> (features float32 [N, 2048], probs float32
    [N, 1008] or [N, 0] without the classifier head); N may be 0."""
    empty = (np.zeros((0, FEATURE_DIM), np.float32),
             np.zeros((0, NUM_LOGITS if self.has_logits else 0), np.float32))
    return batching.in_fixed_batches(lambda x: self._apply(self.variables, x), images,
                                     self.batch_size, empty)
