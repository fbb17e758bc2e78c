"""cfgdiff command line.

  python -m cfgdiff.main --config=experiments/fashion_mnist.py --workdir=DIR [--mode=train]
      [--config.train.num_steps=2000 ...]

The config is validated before JAX compiles anything; bad values exit with one line
naming the key. On a CPU-only host each core becomes its own XLA device, which must be
decided before JAX is imported, so this module imports JAX lazily. On such hosts the
command first re-executes itself under jemalloc when it is installed (cfgdiff/allocator.py).
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cfgdiff import allocator, configs, preemption, topology

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "train_classifier", "sample", "sweep"],
                          "train: train or resume; train_classifier: train or resume the "
                          "noisy classifier of classifier guidance (config.classifier.*) "
                          "in its own WORKDIR, then report its held-out accuracy by noise "
                          "level; sample: guided samples from the latest "
                          "checkpoint into WORKDIR/samples; sweep: FID/IS/precision/recall "
                          "of every run under WORKDIR, for each guidance method of "
                          "config.sweep.methods over its weight grid, into WORKDIR/sweep.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (TPU pods, multi-node GPU). "
    "On TPU VMs and under SLURM the cluster is detected; elsewhere pass the three flags below.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a run under changed training keys (seed, "
    "train.*, data) or changed training data; each change is recorded in "
    "WORKDIR/config_history.jsonl. Without it such a resume is refused.")
flags.mark_flags_as_required(["config", "workdir"])

# Exit statuses a launcher acts on (cfgdiff/preemption.py): 75 saved on SIGTERM and 77 a
# stalled step are requeued by launch/slurm_gpu.sbatch; 76 (the workdir was taken over)
# and 78 (diverged) are not; 2 is a usage or data error.
EXIT_PREEMPTED = preemption.EXIT_PREEMPTED

_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "cfgdiff", "jax")


def _fail(message: str, code: int = 2) -> None:
  print(f"cfgdiff: error: {message}", file=sys.stderr)
  sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with an unknown --config.KEY reported as one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    _fail(f"unknown config key in {overrides} ({e}); known keys are in "
          "cfgdiff/configs.py default_config().")
  except flags.Error as e:
    _fail(str(e))
  return []


def _set_cpu_devices(count: int) -> None:
  """Asks XLA for ``count`` host devices unless the user already chose (XLA_FLAGS).

  With several devices on one host each runs its ops on one thread: one device per
  core without thread-pool contention measured fastest on CPU (BENCHMARKS.md).
  These flags only affect the CPU platform, so they are harmless on TPU/GPU hosts.
  """
  xla_flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in xla_flags:
    xla_flags += f" --xla_force_host_platform_device_count={count}"
    if count > 1 and "xla_cpu_multi_thread_eigen" not in xla_flags:
      xla_flags += " --xla_cpu_multi_thread_eigen=false"
    os.environ["XLA_FLAGS"] = xla_flags.strip()


def _cluster_arguments() -> dict:
  """jax.distributed.initialize arguments: the flags, else JAX_NUM_PROCESSES and
  JAX_PROCESS_ID from the environment (JAX itself reads JAX_COORDINATOR_ADDRESS); what
  is still unset, JAX detects (Cloud TPU metadata, SLURM, Open MPI, Kubernetes)."""
  def from_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None
  return dict(coordinator_address=_COORDINATOR.value,
              num_processes=_NUM_PROCESSES.value if _NUM_PROCESSES.value is not None
              else from_env("JAX_NUM_PROCESSES"),
              process_id=_PROCESS_ID.value if _PROCESS_ID.value is not None
              else from_env("JAX_PROCESS_ID"))


def _quiet_orbax_info(record: std_logging.LogRecord) -> bool:
  """Drops Orbax's INFO lines (a dozen per checkpoint save); its warnings still show."""
  return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def main(argv: list[str]) -> None:
  del argv
  preemption.install()  # first: a SIGTERM from here on is remembered, never lost
  logging.get_absl_handler().addFilter(_quiet_orbax_info)
  config = _CONFIG.value
  try:
    configs.check_known_keys(config)
    training = _MODE.value in ("train", "train_classifier")
    if _MODE.value == "train_classifier":
      config = configs.classifier_run_config(config)
    _set_cpu_devices(configs.auto_cpu_devices(config, os.cpu_count() or 1))
    import jax  # pylint: disable=g-import-not-at-top
    if _MULTIHOST.value:
      jax.distributed.initialize(**_cluster_arguments())
    if jax.process_count() == 1 or jax.default_backend() != "cpu":
      # Not for several CPU processes: only process 0 writes the cache, so after a restart
      # it loads its program at once while the others compile for minutes, and Gloo's
      # 30 s connection deadline for the first collective expires (seen in the rehearsal).
      jax.config.update("jax_compilation_cache_dir",
                        os.environ.get("JAX_COMPILATION_CACHE_DIR", _CACHE_DIR))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    # fsdp = 0 is one node's devices, counted over the processes sharing its host name.
    shape = tuple(config.runtime.mesh_shape)
    node_devices = (topology.node_device_count() if len(shape) == 2 and shape[1] == 0
                    else jax.local_device_count())
    configs.validate(config, jax.device_count(), node_devices)
    # One line naming backend, device kind and count; refuses a CPU fallback on a GPU or
    # TPU machine unless JAX_PLATFORMS=cpu (a ConfigError: one line, nothing written).
    from cfgdiff import backend  # pylint: disable=g-import-not-at-top
    backend.start_up(jax, allocator.in_use())
    if training:
      from cfgdiff import data, memory_plan, sources  # pylint: disable=g-import-not-at-top
      try:  # the data first: a wrong name, split or folder is one line before any tracing
        sources.open_split(config.data, "train")
      except data.DataError as e:
        _fail(str(e))
      # May choose train.microbatch_size; refuses what cannot fit.
      memory_plan.check_training(config, shape[1] if shape[1] > 0 else node_devices)

    # pylint: disable-next=g-import-not-at-top
    from cfgdiff import (
        checkpoint,
        data,
        reference,
        resume,
        sampling,
        sweep,
        train,
        workdir_lock,
    )
    try:
      if training:
        state = train.train(config, _WORKDIR.value, _ALLOW_CONFIG_CHANGE.value)
        if int(state.step) < config.train.num_steps:
          # Saved early on SIGTERM: a distinct code lets a launcher requeue the job.
          sys.exit(preemption.EXIT_PREEMPTED)
        if _MODE.value == "train_classifier":
          _report_classifier(config, state)
      else:
        run = sampling.run if _MODE.value == "sample" else sweep.run
        for path in run(config, _WORKDIR.value):
          print(path)
    except (data.DataError, checkpoint.CheckpointError, reference.ShippedModelError,
            sweep.SweepError, workdir_lock.WorkdirBusyError, resume.ResumeError) as e:
      _fail(str(e))
    except workdir_lock.LockLostError as e:
      _fail(str(e), preemption.EXIT_LOCK_LOST)
    except train.DivergedError as e:
      _fail(str(e), preemption.EXIT_DIVERGED)
    except preemption.Preempted as e:
      logging.warning("%s", e)
      sys.exit(preemption.EXIT_PREEMPTED)
  except configs.ConfigError as e:
    _fail(str(e))


def _report_classifier(config, state) -> None:
  """Logs the trained classifier's held-out accuracy by log-SNR; process 0 writes it to
  WORKDIR/classifier_eval.json."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  from cfgdiff import classifier_eval  # pylint: disable=g-import-not-at-top
  params = multihost_utils.process_allgather(state.ema_params, tiled=True)
  result = classifier_eval.held_out_accuracy(config, params, int(state.step))
  logging.info("%s", classifier_eval.table(result))
  if jax.process_index() == 0:
    print(classifier_eval.write(_WORKDIR.value, result))


def run() -> None:
  try:
    allocator.reexec_with_jemalloc()  # once, before JAX's threads exist
  except allocator.AllocatorError as e:
    _fail(str(e))
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
