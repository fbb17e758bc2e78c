"""U-Net shapes, the null token, and the paper-size model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfgdiff import build, configs
from cfgdiff.models import unet
from experiments import get_experiment


def _randomized_params(model, shape, seed=0):
  """Init, then add noise to every parameter: zero-initialised output layers become live,
  and 1-D parameters (norm scales of 1, biases) keep their init as the noise's centre."""
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros(shape), jnp.zeros(shape[:1]),
                      jnp.zeros(shape[:1], jnp.int32))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, x.shape) + (x if x.ndim == 1 else 0)
                                   for k, x in zip(keys, leaves, strict=True)])


@pytest.fixture(scope="module")
def tiny_model():
  from tests import tiny_config
  config = tiny_config.get_config()
  model = build.make_model(config)
  shape = (3, 8, 8, 1)
  return model, _randomized_params(model, shape), shape, config.data.num_classes


def test_output_shape_and_class_table(tiny_model):
  model, params, shape, num_classes = tiny_model
  out = model.apply(params, jnp.ones(shape), jnp.zeros(3), jnp.array([0, 1, num_classes]))
  assert out.shape == shape and out.dtype == jnp.float32
  assert params["params"]["class_embed"]["embedding"].shape[0] == num_classes + 1


def test_null_token_and_labels_change_output(tiny_model):
  model, params, shape, num_classes = tiny_model
  z = jax.random.normal(jax.random.PRNGKey(3), shape)
  logsnr = jnp.array([0.0, 0.0, 0.0])
  outs = [model.apply(params, z, logsnr, jnp.full((3,), c)) for c in range(num_classes + 1)]
  null = outs[-1]
  for c in range(num_classes):
    assert float(jnp.max(jnp.abs(outs[c] - null))) > 1e-3, f"class {c} equals the null token"
  # Labels act per example: changing example 0's label leaves example 1 untouched.
  mixed = model.apply(params, z, logsnr, jnp.array([num_classes, 0, 0]))
  np.testing.assert_allclose(mixed[1:], outs[0][1:], atol=1e-5)
  np.testing.assert_allclose(mixed[:1], null[:1], atol=1e-5)


def test_logsnr_changes_output(tiny_model):
  model, params, shape, _ = tiny_model
  z = jax.random.normal(jax.random.PRNGKey(3), shape)
  a = model.apply(params, z, jnp.full((3,), -5.0), jnp.zeros(3, jnp.int32))
  b = model.apply(params, z, jnp.full((3,), 5.0), jnp.zeros(3, jnp.int32))
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3


@pytest.mark.parametrize("name, low, high", [("fashion_mnist", 1.0e6, 2.0e6),
                                             ("imagenet64", 2.5e8, 3.5e8)])
def test_experiment_models_build(name, low, high):
  config = get_experiment(name)
  configs.check_known_keys(config)
  model = build.make_model(config)
  size, ch = config.data.image_size, config.data.channels
  x = jnp.zeros((2, size, size, ch))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.zeros(2),
                          jnp.zeros(2, jnp.int32))
  count = sum(p.size for p in jax.tree.leaves(params))
  assert low < count < high, count
  out = jax.eval_shape(lambda p: model.apply(p, x, jnp.zeros(2), jnp.zeros(2, jnp.int32)), params)
  assert out.shape == x.shape


def test_flax_unet_matches_an_independent_torch_implementation(tiny_model):
  torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[fid]'")
  from benchmarks.torch_unet import TorchUNet
  from tests import tiny_config
  model, params, shape, num_classes = tiny_model
  mc = tiny_config.get_config().model
  net = TorchUNet(jax.device_get(params["params"]), mc.ch, mc.ch_mult, mc.num_res_blocks,
                  mc.attn_resolutions, mc.head_channels, mc.num_heads)
  rng = np.random.default_rng(0)
  z = rng.normal(size=shape).astype(np.float32)
  logsnr = np.array([-5.0, 0.0, 7.0], np.float32)
  label = np.array([0, 3, num_classes], np.int32)
  expected = net(torch.from_numpy(z.transpose(0, 3, 1, 2)), torch.from_numpy(logsnr),
                 torch.from_numpy(label).long()).numpy().transpose(0, 2, 3, 1)
  got = np.asarray(model.apply(params, z, logsnr, label))
  assert np.std(expected) > 0.1, "randomized weights make every layer contribute"
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("shape, groups", [((3, 8, 8, 64), 32), ((2, 4, 4, 96), 32),
                                           ((2, 5, 5, 6), 3)])
def test_group_norm_equals_flax_group_norm(shape, groups):
  import flax.linen as nn

  from cfgdiff.models.unet import GroupNorm
  rng = np.random.default_rng(0)
  # Offsets and spreads that differ per channel, so group and channel statistics differ.
  x = jnp.asarray(rng.normal(3.0, 1.0, shape) * rng.uniform(0.5, 4.0, shape[-1]) +
                  rng.normal(0.0, 5.0, shape[-1]), jnp.float32)
  ours, reference = GroupNorm(groups), nn.GroupNorm(groups)
  params = reference.init(jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  assert jax.tree.structure(ours.init(jax.random.PRNGKey(0), x)) == jax.tree.structure(params)
  np.testing.assert_allclose(ours.apply(params, x), reference.apply(params, x), atol=2e-5)


def test_attention_softmax_runs_in_float32_under_bfloat16():
  """ADM computes the attention softmax in float32 even when the network runs in fp16:
  every exp in the bf16 attention block must take float32 inputs."""
  block = unet.AttentionBlock(num_heads=2, dtype=jnp.bfloat16)
  x = jnp.ones((1, 4, 4, 8), jnp.float32)
  params = block.init(jax.random.PRNGKey(0), x)
  jaxpr = jax.make_jaxpr(lambda p: block.apply(p, x))(params)
  exps = [e for e in jaxpr.eqns if e.primitive.name == "exp"]
  assert exps and all(e.invars[0].aval.dtype == jnp.float32 for e in exps), exps
