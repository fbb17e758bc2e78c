"""benchmarks/profile_step.py's join of trace events to HLO: every top-level instruction of a
real compiled program is found, with its opcode, fusion kind and JAX op name."""

import jax
import jax.numpy as jnp

from benchmarks import profile_step


def test_instructions_of_a_compiled_program_are_parsed_and_bucketed():
  def f(x, w):
    return jax.nn.sigmoid(x @ w) * 2.0

  hlo = jax.jit(jax.grad(lambda x, w: f(x, w).sum(), argnums=1)).lower(
      jnp.ones((64, 32)), jnp.ones((32, 16))).compile().as_text()
  instructions = profile_step.hlo_instructions(hlo)
  assert instructions, hlo
  opcodes = {opcode for opcode, _, _ in instructions.values()}
  assert "fusion" in opcodes or "dot" in opcodes, opcodes
  for opcode, kind, _ in instructions.values():
    if opcode == "fusion":
      assert kind.startswith("k"), (opcode, kind)
  buckets = {profile_step.category(*v) for v in instructions.values()}
  assert any(b.startswith(("elementwise", "library", "dot", "copy")) for b in buckets), buckets


def test_categories():
  assert profile_step.category("fusion", "kCustom", "x") == "library fusion (convolution, matmul)"
  assert profile_step.category("copy", "", "") == "copy / transpose"
  assert profile_step.category(
      "fusion", "kLoop", "jit(f)/transpose(jvp(UNet))/ResBlock_1/mul") == "elementwise: bwd mul"
  assert profile_step.category(
      "fusion", "kLoop", "jit(f)/jvp(UNet)/ResBlock_1/jit(silu)/div") == "elementwise: fwd div"
