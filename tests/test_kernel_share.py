"""benchmarks/kernel_share.py's choice of the instructions that are convolutions or matrix
products, on a real compiled program: the library fusions holding them, nothing else."""

import re

import jax
import jax.numpy as jnp

from benchmarks import kernel_share, profile_step


def test_kernel_instructions_are_the_convolutions_and_products_of_a_compiled_program():
  def f(x, kernel, w):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jax.nn.sigmoid(y) * 2.0 + 1.0
    return jnp.tanh(y.reshape(y.shape[0], -1) @ w)

  hlo = jax.jit(f).lower(jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 8)),
                         jnp.ones((512, 16))).compile().as_text()
  kernels = kernel_share.kernel_instructions(hlo)
  everything = profile_step.hlo_instructions(hlo)
  assert kernels and kernels <= set(everything), (kernels, hlo)
  # At least the convolution and the product, and not the elementwise work between them.
  bodies = re.findall(r"(?m)^\s*(?:ROOT )?%?([\w.\-]+) = .*$", hlo)
  assert len(kernels) >= 2, (kernels, hlo)
  assert set(bodies) - kernels, hlo
  for name in kernels:
    line = next(line for line in hlo.splitlines()
                if re.match(rf"\s*(?:ROOT )?%?{re.escape(name)} = ", line))
    called = re.search(r"calls=%?([\w.\-]+)", line)
    if called:
      body = hlo[hlo.index(f"{called.group(1)} ("):]
      body = body[:body.index("\n}")]
      assert re.search(r" (convolution|dot)\(", body), (name, body)
    else:
      assert re.search(r" (convolution|dot)\(", line), line
  elementwise = [name for name, (opcode, kind, _) in everything.items()
                 if opcode == "fusion" and kind == "kLoop"]
  assert elementwise and not set(elementwise) & kernels, (elementwise, kernels)
