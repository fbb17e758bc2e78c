"""What a run is made of, apart from the loop that trains it: the model, the optimizer,
the device mesh and the TrainState with its shardings.

Sampling, evaluation and benchmarks build from here without importing the training loop.
Parameters, EMA and Adam moments are replicated over the mesh's 'data' axis and split over
its 'fsdp' axis (FSDP/ZeRO-3 style); the batch is split over both.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cfgdiff import topology
from cfgdiff.models import NoisyClassifier, UNet

Array = jnp.ndarray
PyTree = Any


@flax.struct.dataclass
class TrainState:
  step: Array  # int32 scalar: updates attempted so far
  params: PyTree
  ema_params: PyTree
  opt_state: optax.OptState
  rng: Array  # uint32 [2]: base key; step s uses fold_in(rng, s)
  num_skipped: Array  # int32 scalar: updates skipped for a non-finite loss or gradient


MODEL_KINDS = {"unet": UNet, "noisy_classifier": NoisyClassifier}


def make_model(config: ml_collections.ConfigDict) -> UNet | NoisyClassifier:
  """The network config.model describes: the denoising U-Net, or (model.kind
  'noisy_classifier', --mode=train_classifier) classifier guidance's noisy classifier."""
  m = config.model
  return MODEL_KINDS[m.kind](
      num_classes=config.data.num_classes, ch=m.ch, ch_mult=tuple(m.ch_mult),
      num_res_blocks=m.num_res_blocks, attn_resolutions=tuple(m.attn_resolutions),
      head_channels=m.head_channels, num_heads=m.num_heads, dropout=m.dropout,
      dtype=jnp.dtype(m.dtype))


def model_inputs(config: ml_collections.ConfigDict, batch_size: int = 1) -> tuple[Array, ...]:
  """Zero inputs of the network's call: (z, logsnr, label) for the U-Net, (z, logsnr) for
  the classifier."""
  size, channels = config.data.image_size, config.data.channels
  inputs = (jnp.zeros((batch_size, size, size, channels)), jnp.zeros((batch_size,)))
  if config.model.kind == "unet":
    inputs += (jnp.zeros((batch_size,), jnp.int32),)
  return inputs


def make_optimizer(train_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam (AdamW with train.weight_decay > 0) with linear warm-up to a constant rate, or,
  with train.anneal_lr, then linearly down to 0 at train.num_steps (ADM's classifier);
  after global-norm gradient clipping (train.grad_clip; 0 = none)."""
  tc = train_config
  if tc.anneal_lr:
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, tc.learning_rate, tc.warmup_steps),
         optax.linear_schedule(tc.learning_rate, 0.0, max(tc.num_steps - tc.warmup_steps, 1))],
        [tc.warmup_steps])
  elif tc.warmup_steps:
    lr = optax.linear_schedule(0.0, tc.learning_rate, tc.warmup_steps)
  else:
    lr = tc.learning_rate
  if tc.weight_decay:
    adam = optax.adamw(lr, b1=tc.adam_b1, b2=tc.adam_b2, weight_decay=tc.weight_decay)
  else:
    adam = optax.adam(lr, b1=tc.adam_b1, b2=tc.adam_b2)
  return optax.chain(optax.clip_by_global_norm(tc.grad_clip) if tc.grad_clip
                     else optax.identity(), adam)


# Mesh axes: 'data' replicates parameters; 'fsdp' shards them (and the optimizer state),
# FSDP/ZeRO-3 style. The batch is split over both, so every device is data-parallel.
MESH_AXES = ("data", "fsdp")
BATCH = P(MESH_AXES)


def make_mesh(shape: tuple[int, int] = (-1, 1),
              devices: list[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp) mesh over ``devices`` (all by default); data = -1 takes the remaining
  devices; fsdp = 0 means one node's device count, each shard group one node's devices in
  process order (shards stay on a node's fast links: 4 chips on a v4/v5p host, 8 GPUs on
  a DGX node, whether SLURM started one process per GPU or one per node;
  `topology.node_device_count`, a collective the first time)."""
  devices = list(devices or jax.devices())
  data, fsdp = shape
  if fsdp == 0:
    fsdp = topology.node_device_count()
    devices.sort(key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices).reshape((data, fsdp)), MESH_AXES)


def leaf_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
  """Shards an array's largest axis that the 'fsdp' axis divides; else replicates it."""
  fsdp = mesh.shape["fsdp"]
  axes = [i for i in np.argsort(shape)[::-1] if fsdp > 1 and shape[i] % fsdp == 0]
  if not axes:
    return NamedSharding(mesh, P())
  spec = [None] * len(shape)
  spec[axes[0]] = "fsdp"
  return NamedSharding(mesh, P(*spec))


def init_state(config: ml_collections.ConfigDict, model: UNet,
               optimizer: optax.GradientTransformation, rng: Array) -> TrainState:
  rng_init, rng_train = jax.random.split(rng)
  params = model.init(rng_init, *model_inputs(config))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=optimizer.init(params), rng=rng_train,
                    num_skipped=jnp.zeros((), jnp.int32))


def state_shardings(config: ml_collections.ConfigDict, model: UNet,
                    optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
  """The TrainState's shardings on ``mesh``: replicated when its 'fsdp' axis has size 1,
  else every parameter, EMA and Adam moment split along its largest divisible axis."""
  return jax.tree.map(lambda x: x.sharding, abstract_state(config, model, optimizer, mesh))


def create_state(config: ml_collections.ConfigDict, model: UNet,
                 optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
  """A fresh TrainState from config.seed, laid out as `state_shardings`."""
  init = jax.jit(lambda rng: init_state(config, model, optimizer, rng),
                 out_shardings=state_shardings(config, model, optimizer, mesh))
  return init(jax.random.PRNGKey(config.seed))


def abstract_state(config: ml_collections.ConfigDict, model: UNet,
                   optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
  """Shapes, dtypes and shardings (those of `state_shardings`) of the TrainState,
  computing nothing.

  Restoring into it reads a checkpoint onto this mesh, whatever mesh wrote it.
  """
  shapes = jax.eval_shape(lambda rng: init_state(config, model, optimizer, rng),
                          jax.random.PRNGKey(0))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=leaf_sharding(x.shape, mesh)),
                      shapes)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, Array]:
  """Assembles the global batch array from this process's slice of it."""
  sharding = NamedSharding(mesh, BATCH)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}
