"""The jitted training step: the joint conditional/unconditional loss, its gradient, Adam and EMA.

The step is jitted once over the (data, fsdp) mesh: the batch is split over every device.
All random numbers are drawn for the global batch inside the step, so the result does not
depend on the device count. On CPU meshes where it computes the same (replicated
parameters, no dropout), each device's gradient is computed inside `jax.shard_map` and the
devices' gradients are averaged as one flat vector (`flat_allreduce_applies`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cfgdiff import build, diffusion
from cfgdiff.models import UNet
from cfgdiff.models import classifier as classifier_net

Array = jnp.ndarray


def _flat_allreduce_is_exact(config: ml_collections.ConfigDict, mesh: Mesh) -> bool:
  """Parameters replicated (no 'fsdp' split) and no dropout: there the flat step computes
  what the SPMD step computes."""
  return mesh.shape["fsdp"] == 1 and config.model.dropout == 0.0


def flat_allreduce_applies(config: ml_collections.ConfigDict, mesh: Mesh) -> bool:
  """Whether the train step averages the devices' gradients as one flat vector (see
  `make_train_step`): on CPU meshes of several devices, where that is exact."""
  on_cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
  return on_cpu and mesh.size > 1 and _flat_allreduce_is_exact(config, mesh)


def make_train_step(config: ml_collections.ConfigDict, model: UNet,
                    optimizer: optax.GradientTransformation, mesh: Mesh,
                    flat_allreduce: bool | None = None, scan_microbatches: bool | None = None,
                    ) -> Callable[[build.TrainState, dict[str, Array]], tuple]:
  """Builds train_step(state, batch) -> (state, metrics) (not yet jitted).

  ``batch`` holds 'image' float32 [B,H,W,C] in [-1, 1] and 'label' int32 [B].
  With train.microbatch_size > 0 the gradient is accumulated over micro-batches: the
  same gradient up to rounding in less memory (on one CPU device it was also 1.4x
  faster; with one device per core it was not, see BENCHMARKS.md). With
  ``scan_microbatches`` (default: off CPU) they run in a `lax.scan`, which holds one
  micro-batch's activations at a time; unrolled, XLA may schedule every forward pass first
  (on CPU, 4 micro-batches of 8 kept 95% of the whole batch's temporary memory), but
  XLA:CPU runs convolutions in a loop body about 30x slower (BENCHMARKS.md).

  With ``flat_allreduce`` (default: `flat_allreduce_applies`) each device computes the
  gradient of its part of the batch (`jax.shard_map`) and the devices average all of it
  in one all-reduce of one flat vector. Otherwise XLA's SPMD partitioner reduces each
  gradient array, in one all-reduce of a tuple of ~200 arrays that XLA:CPU runs array by
  array: 1.05-1.10x slower on the Fashion-MNIST step on 2 devices, 2.1-2.3x across 2
  processes (BENCHMARKS.md). It needs replicated parameters, and no dropout: the SPMD
  step draws the dropout masks for the global batch, which a device's part cannot.
  """
  dc, tc = config.diffusion, config.train
  num_micro = tc.batch_size // tc.microbatch_size if tc.microbatch_size else 1
  micro_sharding = NamedSharding(mesh, P(None, build.MESH_AXES))
  if flat_allreduce is None:
    flat_allreduce = flat_allreduce_applies(config, mesh)
  elif flat_allreduce and not _flat_allreduce_is_exact(config, mesh):
    raise ValueError("The flat gradient all-reduce needs replicated parameters "
                     f"(mesh fsdp=1, not {mesh.shape['fsdp']}) and "
                     f"config.model.dropout=0 (not {config.model.dropout}).")
  if scan_microbatches is None:
    scan_microbatches = any(d.platform != "cpu" for d in mesh.devices.flat)

  # The noisy classifier (--mode=train_classifier) learns p(c | z_l) by cross-entropy on
  # the same z_l as the denoiser, every label kept.
  classifier = config.model.kind == "noisy_classifier"

  def loss_and_grad(params, noised, dropout_rng):
    def loss_fn(p):
      rngs = {"dropout": dropout_rng}
      if classifier:
        logits = model.apply({"params": p}, noised["z"], noised["logsnr"], train=True,
                             rngs=rngs)
        return classifier_net.cross_entropy(logits, noised["label"])
      eps_pred = model.apply({"params": p}, noised["z"], noised["logsnr"], noised["label"],
                             train=True, rngs=rngs)
      return diffusion.eps_loss(eps_pred, noised["eps"])
    return jax.value_and_grad(loss_fn)(params)

  def accumulated_loss_and_grad(params, noised, dropout_rng, in_shard_map=False):
    if num_micro == 1:
      return loss_and_grad(params, noised, dropout_rng)
    split = jax.tree.map(lambda a: a.reshape((num_micro, -1) + a.shape[1:]), noised)
    if not in_shard_map:  # keep every micro-batch split over the devices
      split = jax.lax.with_sharding_constraint(split, micro_sharding)
    if scan_microbatches:
      def accumulate(total, micro_and_index):
        micro, index = micro_and_index
        out = loss_and_grad(params, micro, jax.random.fold_in(dropout_rng, index))
        return jax.tree.map(jnp.add, total, out), None
      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      total, _ = jax.lax.scan(accumulate, zeros, (split, jnp.arange(num_micro)))
      loss, grads = total
      return jax.tree.map(lambda x: x / num_micro, (loss, grads))
    total = None
    for index in range(num_micro):
      micro = jax.tree.map(lambda a, i=index: a[i], split)
      out = loss_and_grad(params, micro, jax.random.fold_in(dropout_rng, index))
      total = out if total is None else jax.tree.map(jnp.add, total, out)
    loss, grads = total
    return jax.tree.map(lambda x: x / num_micro, (loss, grads))

  def flat_reduced_loss_and_grad(params, noised, dropout_rng):
    def per_device(params, noised):  # this device's part of the batch
      loss, grads = accumulated_loss_and_grad(params, noised, dropout_rng, in_shard_map=True)
      flat, unravel = ravel_pytree(grads)
      # Equal parts, so the mean of the parts' means is the batch mean.
      loss, flat = jax.lax.pmean((loss, flat), build.MESH_AXES)
      return loss, unravel(flat)
    # check_vma=False: with it, shard_map would differentiate the replicated parameters
    # as such, summing their gradients over devices itself, array by array.
    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), build.BATCH),
                         out_specs=P(), check_vma=False)(params, noised)

  def train_step(state: build.TrainState, batch: dict[str, Array]):
    rng_noise, rng_dropout = jax.random.split(jax.random.fold_in(state.rng, state.step))
    noised = diffusion.noise_batch(
        rng_noise, batch["image"], batch["label"], p_uncond=0.0 if classifier else dc.p_uncond,
        num_classes=config.data.num_classes, logsnr_min=dc.logsnr_min, logsnr_max=dc.logsnr_max)
    grad_fn = flat_reduced_loss_and_grad if flat_allreduce else accumulated_loss_and_grad
    loss, grads = grad_fn(state.params, noised, rng_dropout)

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = jax.tree.map(lambda e, p: tc.ema_decay * e + (1.0 - tc.ema_decay) * p,
                              state.ema_params, params)
    # A non-finite update is dropped whole: parameters, EMA and optimizer moments.
    keep_if_finite = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep_if_finite(params, state.params),
        ema_params=keep_if_finite(ema_params, state.ema_params),
        opt_state=keep_if_finite(opt_state, state.opt_state),
        num_skipped=state.num_skipped + (~finite).astype(jnp.int32))
    metrics = {"loss": jnp.where(finite, loss, 0.0), "grad_norm": grad_norm,
               "finite": finite.astype(jnp.float32)}
    return new_state, metrics

  return train_step


def compile_train_step(config: ml_collections.ConfigDict, model: UNet,
                       optimizer: optax.GradientTransformation, mesh: Mesh,
                       flat_allreduce: bool | None = None,
                       scan_microbatches: bool | None = None) -> Callable:
  """`make_train_step` jitted with explicit shardings: the state as `build.state_shardings`,
  the batch split over every device, the state's buffers donated."""
  state = build.state_shardings(config, model, optimizer, mesh)
  return jax.jit(make_train_step(config, model, optimizer, mesh, flat_allreduce,
                                 scan_microbatches),
                 in_shardings=(state, NamedSharding(mesh, build.BATCH)),
                 out_shardings=(state, NamedSharding(mesh, P())), donate_argnums=0)
