"""torch weights files read without torch: ``torch.save`` state dicts and TorchScript archives.

A restricted unpickler rebuilds tensors as numpy arrays and refuses every other global, so
a weights file can never run code. Any failure to read is a `TorchFileError` naming the file.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np


class TorchFileError(ValueError):
  """A torch weights file is missing, damaged or holds something else."""


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
  """The object a torch file holds, tensors as numpy; TorchFileError if unreadable."""
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
    raise TorchFileError(f"{path} does not exist.") from e
  except Exception as e:  # damaged files raise anything from zipfile, pickle and numpy
    reason = (str(e).splitlines() or [""])[0]
    raise TorchFileError(f"{path} is not a readable torch weights file "
                                f"({type(e).__name__}: {reason}).") from e


def read_torch_file(path: str) -> dict[str, np.ndarray]:
  """The state dict in a ``torch.save`` file (zip or legacy format) as {name: array},
  without torch. Non-tensor entries are dropped."""
  obj = _read(path, torchscript=False)
  if not isinstance(obj, Mapping):
    raise TorchFileError(f"{path} holds a {type(obj).__name__}, not a state dict.")
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
    raise TorchFileError(f"{path} holds a {type(obj).__name__}, not a TorchScript "
                                "module.")
  return _script_tensors(obj)
