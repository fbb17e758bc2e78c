"""The train step and loop: learning, skipping bad updates, device-count invariance,
bitwise resume, and refusal of bad input, the last three through the real CLI."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfgdiff import (
    allocator,
    build,
    checkpoint,
    configs,
    kernel_choice,
    sources,
    train_step,
)
from tests.conftest import ROOT, TINY_CONFIG, run_cli, xla_flags


@pytest.fixture(scope="module")
def compiled(synthetic_data):
  from tests import tiny_config
  config = tiny_config.get_config()
  config.data.path = synthetic_data
  config.model.dropout = 0.0
  config.train.ema_decay = 0.99
  mesh = build.make_mesh()
  model, optimizer = build.make_model(config), build.make_optimizer(config.train)
  step_fn = train_step.compile_train_step(config, model, optimizer, mesh)
  return config, mesh, model, optimizer, step_fn


def _train(config, mesh, model, optimizer, step_fn, steps: int):
  """(final state, per-step losses) of ``steps`` steps from a fresh state."""
  state = build.create_state(config, model, optimizer, mesh)
  batcher = sources.training_batcher(config)
  losses = []
  for step in range(steps):
    state, metrics = step_fn(state, build.global_batch(batcher.batch(step), mesh))
    losses.append(metrics["loss"])
  return state, [float(x) for x in jax.device_get(losses)]


def test_loss_falls(compiled):
  config, mesh, model, optimizer, step_fn = compiled
  state, losses = _train(config, mesh, model, optimizer, step_fn, 150)
  first, last = np.mean(losses[:20]), np.mean(losses[-30:])
  assert last < 0.6 * first, (first, last)
  assert int(state.step) == 150 and int(state.num_skipped) == 0
  # The EMA trails the parameters but has moved away from the initialisation.
  init = build.create_state(config, model, optimizer, mesh)
  moved = lambda a, b: max(float(jnp.max(jnp.abs(x - y))) for x, y in
                           zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
  assert moved(state.ema_params, init.params) > 1e-3
  assert moved(state.ema_params, state.params) > 0.0


def test_non_finite_update_is_skipped_and_counted(compiled):
  config, mesh, model, optimizer, step_fn = compiled
  state = build.create_state(config, model, optimizer, mesh)
  before = jax.device_get(state)
  bad = {"image": np.full((8, 8, 8, 1), np.nan, np.float32), "label": np.zeros(8, np.int32)}
  state, metrics = step_fn(state, build.global_batch(bad, mesh))
  assert float(metrics["finite"]) == 0.0
  assert int(state.num_skipped) == 1 and int(state.step) == 1
  for a, b in zip(jax.tree.leaves((before.params, before.ema_params, before.opt_state)),
                  jax.tree.leaves(jax.device_get((state.params, state.ema_params,
                                                  state.opt_state))), strict=True):
    np.testing.assert_array_equal(a, b)


def _run_steps(data_dir: str, out: str, devices: int, fsdp: int = 1,
               variant: str = "default") -> dict:
  env = dict(os.environ, XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices}"),
             TF_CPP_MIN_LOG_LEVEL="3")
  subprocess.run([sys.executable, "-m", "tests.run_steps", data_dir, out, "4", str(fsdp),
                  variant], cwd=ROOT, env=env, check=True, timeout=600)
  return dict(np.load(out))


_NOT_STATE = {"devices", "losses", "grad_norms", "held", "allreduce_widths"}


def _largest_difference(a: dict, b: dict) -> float:
  params = [k for k in a if k not in _NOT_STATE]
  assert set(params) == set(b) - _NOT_STATE and len(params) > 10
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in params)


@pytest.fixture(scope="module")
def eight_replicated(synthetic_data, tmp_path_factory) -> dict:
  """4 steps on 8 devices, parameters replicated: compared with 1 device and with FSDP."""
  return _run_steps(synthetic_data, str(tmp_path_factory.mktemp("eight") / "rep.npz"), 8)


def test_eight_devices_equal_one_device(synthetic_data, eight_replicated, tmp_path):
  one = _run_steps(synthetic_data, str(tmp_path / "one.npz"), 1)
  eight = eight_replicated
  assert int(one["devices"]) == 1 and int(eight["devices"]) == 8
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
  # Adam moves a parameter by about lr * sign(g) early on, so where a gradient is near
  # zero (a bias whose contributions cancel) a rounding-level difference can flip a
  # step of size lr = 3e-3. 1e-4 is 1/30 of one step: different noise per device or a
  # wrong reduction moves parameters by whole steps and fails this.
  worst = _largest_difference(one, eight)
  assert worst < 1e-4, f"largest parameter difference {worst}"
  # Guard against a vacuous pass: training moved the parameters.
  assert float(np.std(one["losses"])) > 0


def test_fsdp_sharded_step_equals_replicated_step(synthetic_data, eight_replicated, tmp_path):
  replicated = eight_replicated
  sharded = _run_steps(synthetic_data, str(tmp_path / "fsdp.npz"), 8, fsdp=8)
  assert float(replicated["held"]) == 1.0
  # Every axis of the tiny model's kernels is a multiple of 8 except the 1-channel
  # input/output convs and a few vectors: most of the state is split 8 ways.
  assert float(sharded["held"]) < 0.25, float(sharded["held"])
  np.testing.assert_allclose(sharded["losses"], replicated["losses"], rtol=1e-5)
  worst = _largest_difference(replicated, sharded)
  assert worst < 1e-4, f"largest parameter difference {worst}"


@pytest.fixture(scope="module")
def spmd_four_devices(synthetic_data, tmp_path_factory) -> dict:
  """4 steps of XLA's SPMD step on 4 devices without dropout."""
  return _run_steps(synthetic_data, str(tmp_path_factory.mktemp("spmd") / "spmd.npz"), 4,
                    variant="spmd")


@pytest.mark.parametrize("variant", ["flat", "flat_micro"])
def test_flat_gradient_allreduce_equals_spmd_step(synthetic_data, spmd_four_devices, variant,
                                                  tmp_path):
  """The CPU step that averages the devices' gradients as one flat vector computes what
  XLA's SPMD step computes (with and without micro-batches), in one all-reduce."""
  flat = _run_steps(synthetic_data, str(tmp_path / "flat.npz"), 4, variant=variant)
  spmd = spmd_four_devices
  # The loss and one all-reduce of the flat gradient; the SPMD step sums every array.
  assert sorted(flat["allreduce_widths"]) == [2], flat["allreduce_widths"]
  assert sum(spmd["allreduce_widths"]) > 20, spmd["allreduce_widths"]
  np.testing.assert_allclose(flat["losses"], spmd["losses"], rtol=1e-6)
  # Adam's update does not see the gradient's scale: a gradient summed instead of averaged
  # over devices would show here only.
  np.testing.assert_allclose(flat["grad_norms"], spmd["grad_norms"], rtol=1e-5)
  worst = _largest_difference(flat, spmd)  # 1e-4: see test_eight_devices_equal_one_device
  assert worst < 1e-4, f"largest parameter difference {worst}"
  assert float(np.std(flat["losses"])) > 0


def test_flat_gradient_allreduce_is_chosen_only_where_it_is_exact():
  from tests import tiny_config
  config = tiny_config.get_config()
  devices = np.array([jax.devices()[0]] * 2)  # a 2-device mesh: only its shape is read
  two = jax.sharding.Mesh(devices.reshape(2, 1), build.MESH_AXES)
  split = jax.sharding.Mesh(devices.reshape(1, 2), build.MESH_AXES)
  make = lambda mesh: train_step.make_train_step(config, build.make_model(config),
                                            build.make_optimizer(config.train), mesh,
                                            flat_allreduce=True)
  assert not train_step.flat_allreduce_applies(config, two)  # the tiny config has dropout
  with pytest.raises(ValueError, match="dropout=0"):
    make(two)
  config.model.dropout = 0.0
  assert train_step.flat_allreduce_applies(config, two)
  assert not train_step.flat_allreduce_applies(config, split)
  assert not train_step.flat_allreduce_applies(config, build.make_mesh(devices=jax.devices()[:1]))
  with pytest.raises(ValueError, match="fsdp=1"):
    make(split)


def _final_state(workdir: str, step: int, data_dir: str) -> build.TrainState:
  """Reads a checkpoint (written from any number of devices) onto this process's 1-device
  mesh, under the config the workdir was trained with."""
  config = configs.from_json(os.path.join(workdir, "config.json"))
  config.data.path = data_dir
  mesh = build.make_mesh()
  target = build.abstract_state(config, build.make_model(config),
                                build.make_optimizer(config.train), mesh)
  state, position = checkpoint.Checkpointer(workdir).restore(target, step)
  assert position == {"next_step": step}
  return state


def test_resume_is_bitwise_equal_to_uninterrupted_run(synthetic_data, tmp_path):
  """Also: the uninterrupted run uses the C library's malloc and the split one jemalloc,
  preloaded by cfgdiff.main's re-execution (the allocator changes speed, never results)."""
  common = [f"--config={TINY_CONFIG}", f"--config.data.path={synthetic_data}",
            "--config.runtime.cpu_devices=2"]
  whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
  glibc = {"LD_PRELOAD": "", "CFGDIFF_MALLOC": "system"}
  # As from a fresh shell (make test runs pytest itself under jemalloc): re-executes.
  jemalloc = {"LD_PRELOAD": "", "CFGDIFF_MALLOC": "", allocator.REEXECUTED: ""}
  for workdir, steps, env in ((whole, 6, glibc), (split, 3, jemalloc), (split, 6, jemalloc)):
    proc = run_cli(*common, f"--workdir={workdir}", f"--config.train.num_steps={steps}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if env is glibc:
      expected = "the C library's malloc (CFGDIFF_MALLOC=system)"
    elif allocator.accelerator_present(os.environ):
      expected = "the C library's malloc"
    elif allocator.find_jemalloc():
      expected = "jemalloc (MALLOC_CONF=dirty_decay_ms:-1"
    else:
      expected = f"the C library's malloc; CPU training runs 1.1-1.3x faster with " \
                 f"jemalloc: {allocator.INSTALL_HINT}"
    assert f"memory allocator: {expected}" in proc.stderr
  assert "Resumed from" in proc.stderr
  a, b = _final_state(whole, 6, synthetic_data), _final_state(split, 6, synthetic_data)
  leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 10
  for (path, x), y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
  assert int(a.step) == 6
  assert os.path.exists(os.path.join(whole, "config.json"))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(whole))
  assert "ETA" in proc.stderr, "progress with an ETA is reported"
  assert "checkpoint_manager.py" not in proc.stderr, "Orbax's INFO lines are filtered out"


def test_hundreds_of_steps_between_logs_do_not_deadlock(synthetic_data, tmp_path):
  """400 steps on 2 devices with nothing between them that waits for the devices. With the
  loop dispatching unboundedly ahead, jaxlib 0.10.2's CPU client deadlocked in the gradient
  all-reduce and aborted after 60 s: this test in 1 run of 1, 600 steps in 1 of 1, and
  make run about 150 steps in, 5 runs of 5."""
  proc = run_cli(f"--config={TINY_CONFIG}", f"--config.data.path={synthetic_data}",
                 f"--workdir={tmp_path}", "--config.runtime.cpu_devices=2",
                 "--config.train.num_steps=400", "--config.train.log_every_steps=400",
                 "--config.train.checkpoint_every_steps=400", timeout=180)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[400] grad_norm=" in proc.stderr


@pytest.mark.parametrize("override, message", [
    ("--config.diffusion.p_uncond=1.5",
     "config.diffusion.p_uncond=1.5 is invalid: must lie in [0, 1]"),
    ("--config.train.batch_size=0", "config.train.batch_size=0 is invalid"),
    ("--config.train.batch_size=7", "must be divisible by the device count 2"),
    ("--config.data.image_size=10", "must be divisible by 4"),
    ("--config.train.bogus=1", "unknown config key"),
    ("--config.train.kernel_gradient=fast",
     "config.train.kernel_gradient='fast' is invalid: must be one of ('auto', 'taps', 'xla')"),
    ("--config.data.path=/nonexistent", "apt-get install dataset-fashion-mnist"),
    ("--config.data.image_size=16", "holds images of shape (8, 8, 1), but"),
    ("--config.data.num_classes=2", "has label 3, outside [0, config.data.num_classes=2)"),
    ("--config.data.name=imagenet_resized/64x64", "tfds build imagenet_resized/64x64"),
])
def test_bad_input_is_refused_in_one_line(synthetic_data, tmp_path, override, message):
  args = [f"--config={TINY_CONFIG}", f"--config.data.path={synthetic_data}",
          f"--workdir={tmp_path / 'w'}", "--config.runtime.cpu_devices=2", override]
  if "image_size" in override:
    args.append("--config.model.ch_mult=(1,2,2)")
  proc = run_cli(*args)
  assert proc.returncode != 0
  error_lines = [l for l in proc.stderr.splitlines() if l.startswith("cfgdiff: error:")]
  assert len(error_lines) == 1 and message in error_lines[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_corrupt_checkpoint_is_reported_and_kept(synthetic_data, tmp_path):
  workdir = str(tmp_path / "w")
  common = [f"--config={TINY_CONFIG}", f"--config.data.path={synthetic_data}",
            f"--workdir={workdir}", "--config.train.num_steps=3"]
  assert run_cli(*common).returncode == 0
  state_dir = os.path.join(workdir, "checkpoints", "3", "state")
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"corrupt")
  proc = run_cli(*common[:-1], "--config.train.num_steps=6")
  assert proc.returncode != 0
  assert "cfgdiff: error: checkpoint" in proc.stderr and "cannot be restored" in proc.stderr
  assert os.path.isdir(state_dir), "a damaged checkpoint is reported, never deleted"


def test_resume_under_a_different_model_is_refused(synthetic_data, tmp_path):
  workdir = str(tmp_path / "w")
  common = [f"--config={TINY_CONFIG}", f"--config.data.path={synthetic_data}",
            f"--workdir={workdir}", "--config.train.num_steps=2"]
  assert run_cli(*common).returncode == 0
  proc = run_cli(*common, "--config.model.ch=16")
  assert proc.returncode != 0 and "config.model.ch=8, not 16" in proc.stderr


def test_sigterm_saves_at_the_next_step_and_the_relaunch_continues(synthetic_data, tmp_path):
  workdir = str(tmp_path / "preempted")
  args = [sys.executable, "-m", "cfgdiff.main", f"--config={TINY_CONFIG}",
          f"--config.data.path={synthetic_data}", f"--workdir={workdir}",
          "--config.train.checkpoint_every_steps=100000", "--config.train.log_every_steps=1"]
  proc = subprocess.Popen([*args, "--config.train.num_steps=100000"], cwd=ROOT,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
                          stderr=subprocess.PIPE, text=True)
  lines = []
  for line in proc.stderr:  # wait until training is really under way
    lines.append(line)
    if "] [3] " in line:
      break
  # A second job on the same workdir (a double launch, a requeue racing the old job) is
  # refused in one line before it writes anything; the live run goes on untouched.
  lock = pathlib.Path(workdir, "train.lock")
  holder = json.loads(lock.read_text())
  second = run_cli(*args[3:], "--config.train.num_steps=100000")
  assert second.returncode == 2, second.stderr[-3000:]
  error = second.stderr.strip().splitlines()[-1]
  assert error.startswith("cfgdiff: error: ") and "being trained by a live job" in error
  assert f"pid {proc.pid}" in error
  assert json.loads(lock.read_text())["token"] == holder["token"]
  proc.send_signal(signal.SIGTERM)
  lines += proc.stderr.readlines()
  # Saved and stopped early: exit status 75 (EX_TEMPFAIL) tells a launcher to requeue.
  assert proc.wait(timeout=300) == 75, "".join(lines)[-3000:]
  log = "".join(lines)
  assert "Preempted (SIGTERM) at step" in log
  stopped = int(log.split("Preempted (SIGTERM) at step ")[1].split(":")[0])
  assert 3 <= stopped < 100000
  assert checkpoint.Checkpointer(workdir).latest_step() == stopped
  assert not lock.exists(), "a job that ends must release the workdir"
  relaunch = run_cli(*args[3:], f"--config.train.num_steps={stopped + 2}")
  assert relaunch.returncode == 0, relaunch.stderr[-3000:]
  assert f"from step {stopped}" in relaunch.stderr
  assert _final_state(workdir, stopped + 2, synthetic_data).step == stopped + 2


def test_kernel_gradient_is_timed_once_per_workdir(synthetic_data, tmp_path, monkeypatch):
  """"auto" compiles and times the step both ways, keeps the faster and saves the choice;
  a resumed run reuses it without timing; a checkpoint without a saved choice keeps the
  taps; "taps" and "xla" compile only their own step and record it."""
  from tests import tiny_config
  config = tiny_config.get_config()
  config.data.path = synthetic_data
  config.train.kernel_gradient = "auto"
  mesh = build.make_mesh()
  model, optimizer = build.make_model(config), build.make_optimizer(config.train)
  state = build.create_state(config, model, optimizer, mesh)
  real_compile = train_step.compile_train_step
  compiled_with, executables = [], {}  # kernel_grad_taps of every step built; AOT-compiled

  class Recorder:
    def __init__(self, jitted, taps):
      self.jitted, self.taps = jitted, taps

    def lower(self, *args):
      lowered = self.jitted.lower(*args)
      return types.SimpleNamespace(
          compile=lambda: executables.setdefault(self.taps, lowered.compile()))

  def spy(config, model, optimizer, mesh):
    compiled_with.append(model.kernel_grad_taps)
    return Recorder(real_compile(config, model, optimizer, mesh), model.kernel_grad_taps)
  monkeypatch.setattr(train_step, "compile_train_step", spy)
  saved_path = tmp_path / "kernel_gradient.json"

  def choose(state=state):
    compiled_with.clear()
    return kernel_choice.compile_train_step(config, model, optimizer, mesh, state,
                                                str(tmp_path))

  step_fn = choose()
  saved = json.loads(saved_path.read_text())
  assert compiled_with == [True, False]
  seconds = saved["seconds_per_step"]
  assert set(seconds) == {"taps", "xla"} and 0 < min(seconds.values()) < max(seconds.values())
  assert saved["kernel_gradient"] == min(seconds, key=seconds.get)
  assert kernel_choice.saved_kernel_gradient(str(tmp_path)) == saved["kernel_gradient"]
  assert step_fn is executables[saved["kernel_gradient"] == "taps"]  # the faster one runs
  # The two executables differ: the taps turn kernel-gradient convolutions into products.
  assert (executables[True].as_text().count(" convolution(")
          < executables[False].as_text().count(" convolution("))
  batch = build.global_batch(sources.training_batcher(config).batch(0), mesh)
  new_state, metrics = step_fn(jax.tree.map(jnp.copy, state), batch)
  assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"]))

  for choice in ("taps", "xla"):  # resumed: the saved choice, nothing timed or rewritten
    saved_path.write_text(json.dumps(dict(saved, kernel_gradient=choice)))
    choose()
    assert compiled_with == [choice == "taps"]
    assert json.loads(saved_path.read_text())["seconds_per_step"] == seconds
  for unreadable in ("{not json", '{"kernel_gradient": "fast"}', "[]"):  # timed again
    saved_path.write_text(unreadable)
    assert kernel_choice._saved_kernel_gradient(saved_path) == "auto"
    assert kernel_choice.saved_kernel_gradient(str(tmp_path)) == "auto"
  saved_path.unlink()  # a checkpoint from before the file existed: the taps it used
  choose(state.replace(step=state.step + 3))
  assert compiled_with == [True]
  assert json.loads(saved_path.read_text())["kernel_gradient"] == "taps"
  for mode, taps in (("xla", False), ("taps", True)):
    config.train.kernel_gradient = mode
    choose()
    assert compiled_with == [taps]
    assert json.loads(saved_path.read_text()) == {"kernel_gradient": mode,
                                                  "seconds_per_step": None}


def test_bfloat16_compute_trains_with_float32_parameters(synthetic_data):
  from tests import tiny_config
  config = tiny_config.get_config()
  config.data.path = synthetic_data
  config.model.dtype = "bfloat16"
  config.model.dropout = 0.0
  mesh = build.make_mesh()
  model, optimizer = build.make_model(config), build.make_optimizer(config.train)
  # The convolutions and matmuls really run in bfloat16.
  params = build.abstract_state(config, model, optimizer, mesh).params
  jaxpr = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, jnp.zeros((2, 8, 8, 1)),
                                                   jnp.zeros(2), jnp.zeros(2, jnp.int32)))(
                                                       params))
  assert "conv_general_dilated" in jaxpr and "bf16[2,8,8,8]" in jaxpr
  step_fn = train_step.compile_train_step(config, model, optimizer, mesh)
  state, losses = _train(config, mesh, model, optimizer, step_fn, 150)
  assert np.all(np.isfinite(losses)) and int(state.num_skipped) == 0
  assert np.mean(losses[-30:]) < 0.6 * np.mean(losses[:20]), (losses[:20], losses[-30:])
  for tree in (state.params, state.ema_params, state.opt_state):
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(tree))
