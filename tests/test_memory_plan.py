"""The memory plan against XLA's own buffer assignment of the compiled step on CPU, the
micro-batch choice and refusals, and the start-up check through the real CLI."""

import os

import jax
import numpy as np
import pytest

from benchmarks import common
from cfgdiff import configs, memory_plan, train_step
from tests.conftest import TINY_CONFIG, run_cli


def _config(batch: int, micro: int = 0, size: int = 8, ch: int = 8, dropout: float = 0.1):
  from tests import tiny_config
  config = tiny_config.get_config()
  config.model.dropout = dropout
  config.train.kernel_gradient = "xla"
  config.train.batch_size, config.train.microbatch_size = batch, micro
  config.data.image_size, config.model.ch = size, ch
  return config


def _xla_step_bytes(compiled) -> int:
  """Peak bytes of one call as XLA assigned them: inputs, outputs not aliased to a
  donated input, and temporaries."""
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def _compile(config, scan_microbatches=None):
  mesh, model, optimizer, state, images = common.train_setup(config)  # this process: 1 device
  step = train_step.compile_train_step(config, model.clone(kernel_grad_taps=False), optimizer,
                                  mesh, scan_microbatches=scan_microbatches)
  return step.lower(state, images).compile(), state, images


@pytest.fixture(scope="module")
def compiled_steps():
  """{name: (config, compiled step, state, batch)}: the plan's two test configs whole, and
  the first with 4 micro-batches in a lax.scan (what accelerators run). The first has no
  dropout, whose masks micro-batches draw apart, so that both compute the same step."""
  steps = {}
  for name, config, scan in (
      ("8x8, batch 32", _config(32, dropout=0.0), None),
      ("8x8, batch 32, micro-batches of 8", _config(32, 8, dropout=0.0), True),
      ("16x16, 16 channels, batch 16, dropout", _config(16, size=16, ch=16), None)):
    steps[name] = (config, *_compile(config, scan))
  return steps


def test_plan_bounds_xla_compiled_memory_on_cpu(compiled_steps):
  for name, (config, compiled, _, _) in compiled_steps.items():
    planned = memory_plan.make_plan(config, num_chips=1, fsdp=1).step_bytes()
    measured = _xla_step_bytes(compiled)
    # The plan counts every residual jax.vjp keeps; XLA fuses some away: never under,
    # and for whole batches at most ESTIMATE_TOLERANCE over (micro-batches in a scan
    # reuse more: 1.5x measured).
    assert measured <= planned, (name, planned, measured)
    if not config.train.microbatch_size:
      assert planned <= measured * (1 + memory_plan.ESTIMATE_TOLERANCE), (
          name, planned, measured)


def test_scanned_micro_batches_hold_one_micro_batch_and_compute_the_same_step(
    compiled_steps):
  _, whole, state, batch = compiled_steps["8x8, batch 32"]
  _, micro, _, _ = compiled_steps["8x8, batch 32, micro-batches of 8"]
  whole_temp = whole.memory_analysis().temp_size_in_bytes
  micro_temp = micro.memory_analysis().temp_size_in_bytes
  assert micro_temp < 0.5 * whole_temp, (micro_temp, whole_temp)
  copy = lambda s: jax.tree.map(lambda x: x.copy(), s)  # the steps donate their input
  (_, ma), (_, mb) = whole(copy(state), batch), micro(copy(state), batch)
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
  np.testing.assert_allclose(ma["grad_norm"], mb["grad_norm"], rtol=1e-4)


def _plan(per_example=100, fixed=10, state=1000, parameters=200, examples=64, micro=64):
  return memory_plan.MemoryPlan(
      num_parameters=50, state_bytes=state, parameter_bytes=parameters,
      activations=memory_plan.Activations(per_example=per_example, fixed=fixed),
      examples_per_chip=examples, microbatch_per_chip=micro, batch_input_bytes_per_example=1)


def test_step_bytes_add_state_gradients_and_activations():
  plan = _plan()
  assert plan.step_bytes() == 1000 + 2 * 200 + 10 + 100 * 64 + 64
  # Micro-batches of 16: the running gradient sum joins.
  assert plan.step_bytes(16) == 1000 + 3 * 200 + 10 + 100 * 16 + 64


def test_a_batch_that_fits_keeps_the_config():
  config = _config(64 * 8)
  micro, line = memory_plan.fit(config, _plan(), 8, limit_bytes=10_000, where="test chip")
  assert micro == 0 and "Memory plan:" in line


def test_micro_batches_are_chosen_when_the_whole_batch_does_not_fit():
  config = _config(64 * 8)
  plan = _plan()  # whole batch 7874 bytes; 16 per chip: 3274, 32: 4874
  micro, line = memory_plan.fit(config, plan, 8, limit_bytes=4900 / 0.9, where="test chip")
  assert micro == 32 * 8, line  # the largest that fits, a multiple of the chip count
  assert f"train.microbatch_size={micro}" in line and "chosen" in line


def test_a_microbatch_size_that_does_not_fit_is_refused_naming_one_that_does():
  config = _config(64 * 8, micro=64 * 8 // 2)
  plan = _plan(micro=32)
  with pytest.raises(configs.ConfigError, match=r"--config.train.microbatch_size=128 \("):
    memory_plan.fit(config, plan, 8, limit_bytes=3300 / 0.9, where="test chip")


def test_a_step_that_fits_nowhere_is_refused_naming_the_fixes():
  with pytest.raises(configs.ConfigError, match=r"even at one example.*mesh_shape"):
    memory_plan.fit(_config(64 * 8), _plan(), 8, limit_bytes=1000, where="test chip")


def test_chip_table_covers_the_chips_users_train_on():
  for key in ("a100-40gb", "a100-80gb", "h100-80gb", "h200", "tpu-v4", "tpu-v5e", "tpu-v5p"):
    assert memory_plan.CHIPS[key].memory_bytes > 8 * memory_plan.GiB


def test_cli_refuses_a_batch_that_cannot_fit_before_writing_anything(synthetic_data,
                                                                     tmp_path):
  workdir = tmp_path / "run"
  proc = run_cli(f"--config={TINY_CONFIG}", f"--config.data.path={synthetic_data}",
                 f"--workdir={workdir}", "--config.runtime.device_memory_gib=0.0001")
  lines = [line for line in proc.stderr.splitlines() if line.startswith("cfgdiff: error:")]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert "even at one example per pass" in lines[0] and "mesh_shape" in lines[0]
  assert not os.path.exists(workdir)


def test_cli_chooses_micro_batches_that_fit_and_trains(synthetic_data, tmp_path):
  config = _config(8)
  plan = memory_plan.make_plan(config, num_chips=1, fsdp=1)
  # Room for 4 of the 8 examples per pass, not for 8.
  gib = plan.step_bytes(4) / 0.9 / memory_plan.GiB * 1.01
  assert plan.step_bytes() > gib * 0.9 * memory_plan.GiB
  proc = run_cli(f"--config={TINY_CONFIG}", f"--config.data.path={synthetic_data}",
                 f"--workdir={tmp_path}", "--config.train.num_steps=2",
                 "--config.runtime.cpu_devices=1", f"--config.runtime.device_memory_gib={gib}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "train.microbatch_size=4 (4 per chip per pass" in proc.stderr, proc.stderr[-3000:]
