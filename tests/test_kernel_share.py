"""benchmarks/kernel_share.py's choice of the instructions that are convolutions or matrix
products, on a real compiled program: the operations that run them (a bare convolution and
a library fusion holding a product), nothing inside a fusion, no elementwise fusion."""

import re

import jax
import jax.numpy as jnp

from benchmarks import kernel_share, profile_step


def _entry_instructions(hlo: str) -> dict[str, str]:
  """Name -> line of each instruction of the ENTRY computation: what runs as an operation."""
  entry = hlo[hlo.index("\nENTRY "):]
  entry = entry[:entry.index("\n}")]
  return {m.group(1): m.group(0)
          for m in re.finditer(r"(?m)^\s*(?:ROOT )?%?([\w.\-]+) = .*$", entry)}


def _body(hlo: str, line: str) -> str:
  """The computation a fusion's line calls."""
  called = re.search(r"calls=%?([\w.\-]+)", line).group(1)
  body = hlo[re.search(rf"(?m)^%?{re.escape(called)} \(", hlo).start():]
  return body[:body.index("\n}")]


def test_kernel_instructions_are_the_convolutions_and_products_of_a_compiled_program():
  def f(x, kernel, w):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jax.nn.sigmoid(y) * 2.0 + 1.0
    return jnp.tanh(y.reshape(y.shape[0], -1) @ w)

  hlo = jax.jit(f).lower(jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 8)),
                         jnp.ones((512, 16))).compile().as_text()
  kernels = kernel_share.kernel_instructions(hlo)
  entry = _entry_instructions(hlo)
  assert kernels <= set(entry), (kernels, hlo)  # nothing from inside a fusion
  holds = {name: " convolution(" in line or " dot(" in line
           or (" fusion(" in line and bool(re.search(r" (convolution|dot)\(", _body(hlo, line))))
           for name, line in entry.items()}
  # Exactly the entry's operations that are, or fuse, a convolution or a product ...
  assert kernels == {name for name, kernel in holds.items() if kernel}, (kernels, hlo)
  # ... which here are both kinds: a product inside a library fusion, and a convolution.
  assert any(" fusion(" in entry[name] and " dot(" in _body(hlo, entry[name])
             for name in kernels), hlo
  assert any(" convolution(" in entry[name] or " convolution(" in _body(hlo, entry[name])
             for name in kernels), hlo
  elementwise = [name for name, line in entry.items() if "kind=kLoop" in line]
  assert elementwise and not set(elementwise) & kernels, (elementwise, kernels)


def test_multi_output_instructions_are_parsed():
  hlo = jax.jit(lambda x: (jnp.sin(x) * 2, jnp.sin(x) + 1)).lower(
      jnp.ones((64, 32))).compile().as_text()
  tuples = [name for name, line in _entry_instructions(hlo).items()
            if re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = \(", line)]
  assert tuples, hlo  # the program has an instruction of tuple shape
  instructions = profile_step.hlo_instructions(hlo)
  assert set(tuples) <= set(instructions), (tuples, instructions)
