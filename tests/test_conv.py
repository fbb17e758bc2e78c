"""The convolution with a matrix-product kernel gradient computes what XLA's computes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cfgdiff.models import conv, unet

NHWC = ("NHWC", "HWIO", "NHWC")


def _loss(conv_fn, padding):
  # A nonlinear loss so that the output gradient dy differs at every position.
  return lambda x, kernel: jnp.sum(jnp.sin(conv_fn(x, kernel, (1, 1), padding,
                                                   dimension_numbers=NHWC)))


C = conv.MIN_INPUT_CHANNELS  # the fewest input channels that take the taps path


@pytest.mark.parametrize("image, kernel_shape, padding", [
    ((2, 9, 7, C), (3, 3, C, 5), "SAME"),
    ((2, 9, 7, C), (1, 1, C, 5), "SAME"),
    ((2, 9, 7, C), (3, 3, C, 5), "VALID"),
    ((1, 6, 6, C), (5, 5, C, 2), "SAME"),
    ((2, 9, 7, C), (3, 2, C, 5), ((2, 0), (1, 3))),  # uneven, output larger than input
])
def test_value_and_gradients_equal_xla_convolution(image, kernel_shape, padding):
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  x = jax.random.normal(keys[0], image)
  kernel = jax.random.normal(keys[1], kernel_shape)
  expected = jax.value_and_grad(_loss(lax.conv_general_dilated, padding), (0, 1))(x, kernel)
  actual = jax.jit(jax.value_and_grad(_loss(conv.conv_general_dilated, padding), (0, 1)))(
      x, kernel)
  np.testing.assert_allclose(actual[0], expected[0], rtol=1e-5)
  for got, want in zip(actual[1], expected[1], strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels, taps, expected", [(C, True, 2), (C - 1, True, 3),
                                                      (C, False, 3)])
def test_kernel_gradient_is_matrix_products_on_cpu(channels, taps, expected):
  """On CPU the compiled gradient holds two convolutions (forward, input gradient), not
  three: the kernel gradient is the taps' dot products. Below MIN_INPUT_CHANNELS, or with
  ``taps=False``, it is XLA's own."""
  x, kernel = jnp.ones((2, 8, 8, channels)), jnp.ones((3, 3, channels, 6))

  def convolutions(conv_fn):
    hlo = jax.jit(jax.grad(_loss(conv_fn, "SAME"), (0, 1))).lower(x, kernel).compile().as_text()
    return hlo.count(" convolution(")

  assert convolutions(lax.conv_general_dilated) == 3
  assert convolutions(functools.partial(conv.conv_general_dilated, taps=taps)) == expected


def test_other_convolutions_are_passed_to_xla():
  x, kernel = jnp.ones((1, 8, 8, C)), jnp.ones((3, 3, C, 2))
  strided = conv.conv_general_dilated(x, kernel, (2, 2), "SAME", dimension_numbers=NHWC)
  np.testing.assert_array_equal(strided, lax.conv_general_dilated(
      x, kernel, (2, 2), "SAME", dimension_numbers=NHWC))


def test_unet_gradients_equal_those_with_xla_kernel_gradients():
  """The whole U-Net: same parameters, output and parameter gradients with the taps as
  with XLA's own kernel gradient (what flax's nn.Conv computes)."""
  from tests import tiny_config
  config = tiny_config.get_config()
  model = unet.UNet(num_classes=config.data.num_classes, ch=C, ch_mult=(1, 2),
                    num_res_blocks=1, attn_resolutions=(), head_channels=C)
  z = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
  logsnr, label = jnp.array([-1.0, 2.0]), jnp.array([0, config.data.num_classes])
  # Random values for every parameter (live output layers, so every kernel gets a
  # gradient), from the shapes alone: compiling model.init would double the test's time.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: rng.normal(0.0, 0.3, p.shape).astype(np.float32),
                        jax.eval_shape(model.init, jax.random.PRNGKey(0), z, logsnr, label))

  def value_and_grad(taps):
    tuned = model.clone(kernel_grad_taps=taps)
    loss = lambda p: jnp.sum(jnp.square(tuned.apply(p, z, logsnr, label)))
    return jax.device_get(jax.jit(jax.value_and_grad(loss))(params))

  fast, plain = value_and_grad(True), value_and_grad(False)
  np.testing.assert_allclose(fast[0], plain[0], rtol=1e-5)
  kernels = 0
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(fast[1]),
                               jax.tree.leaves(plain[1]), strict=True):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4, err_msg=str(path))
    kernels += "Conv" in str(path) and np.abs(want).max() > 0
  assert kernels >= 10  # the comparison covered live convolution kernels
