"""Sampling from a trained workdir: EMA parameters, sharded guided sampling, image files.

`CheckpointSampler` is the notebook-facing API; `run` is what --mode=sample calls.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image, ImageDraw, ImageFont

from cfgdiff import (
  build,
  checkpoint,
  data,
  files,
  guide_networks,
  preemption,
  reference,
  samplers,
  sources,
)
from cfgdiff.progress import Progress


def jit_sample_fn(model: nn.Module, mesh: Mesh, spec: samplers.SamplerSpec,
                  image_shape: tuple[int, int, int], null_label: int, method: str = "cfg",
                  helper: nn.Module | None = None, classifier_model: str = "conditional"):
  """fn((params, helper_params), keys [B,2], labels [B], w [B], options) ->
  (x [B,H,W,C], forward passes), jitted with the batch split over the mesh's 'data' axis
  and parameters replicated. ``method``, ``helper``: as `guide_networks.make_guide`."""

  def fn(all_params, keys, labels, w, options):
    params, helper_params = all_params
    guide = guide_networks.make_guide(method, model, params, helper, helper_params,
                                      null_label, spec.fused, classifier_model)
    return samplers.sample(guide, keys, labels, w, image_shape, spec, options)

  split, replicated = NamedSharding(mesh, build.BATCH), NamedSharding(mesh, P())
  return jax.jit(fn, in_shardings=(replicated, split, split, split, replicated),
                 out_shardings=(split, replicated))


class CheckpointSampler:
  """Guided samples from the EMA parameters of a workdir's latest checkpoint.

  One compiled program per (sampler, num_steps, fused): w, labels, seeds and the
  guidance options are traced, the parameters are an argument (so `load` of another
  step compiles nothing), and requests are padded to the compiled batch size.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | None,
               step: int | None = None, params=None):
    """Reads the EMA parameters of checkpoint ``step`` (the latest when None) of
    ``workdir``; or, given ``params`` (e.g. a shipped reference model's), samples from
    those, ``step`` then only saying where they came from."""
    self.config, self.workdir = config, workdir
    self.mesh = build.make_mesh()
    self.model = build.make_model(config)
    self.num_classes = config.data.num_classes
    devices = jax.device_count()
    self.batch_size = -(-config.sample.batch_size // devices) * devices
    self._compiled, self._helpers = {}, {}
    if params is None:
      self.load(step)
    else:
      self.params, self.step = params, int(step or 0)

  @classmethod
  def from_reference(cls, name: str,
                     sample_config: ml_collections.ConfigDict | None = None,
                     shipped=None) -> CheckpointSampler:
    """Samples from the shipped reference model ``name`` (`cfgdiff.reference`) with the
    options of ``sample_config`` (a config.sample; None: those it was trained with).
    ``shipped``: the model as `reference.load` returned it, if already loaded."""
    shipped = shipped or reference.load(name)
    config = shipped.config.copy_and_resolve_references()
    if sample_config is not None:
      config.sample = sample_config
    return cls(config, None, shipped.step, params=shipped.params)

  def load(self, step: int | None = None) -> None:
    """Samples from checkpoint ``step`` (the latest when None) from now on."""
    self.params, self.step = checkpoint.load_ema_params(self.config, self.workdir, self.mesh, step)

  def guide_helper(self, method: str | None = None) -> guide_networks.GuideHelper | None:
    """The network guidance ``method`` (default config.sample.guidance) reads beside this
    sampler's denoiser, checked (`guide_networks.resolve_guide_helper`); None for 'cfg'."""
    return guide_networks.resolve_guide_helper(self.config, self.workdir, method, self.step)

  def guide_cost(self, method: str, sampler: str, num_steps: int) -> tuple[int, int]:
    """(network forward passes, backward passes) per sample of a ``num_steps`` run of
    ``sampler`` guided by ``method`` at every step, as its `guidance.Guide` declares."""
    helper = self.guide_helper(method)
    module = build.make_model(helper.config) if helper else None
    guide = guide_networks.make_guide(method, self.model, None, module, None, self.num_classes,
                       self.config.sample.fused, self.config.sample.classifier_model)
    return (samplers.network_evaluations(sampler, num_steps, guide.evaluations),
            samplers.network_evaluations(sampler, num_steps, guide.backward_passes))

  def _helper(self, method: str):
    """(module, params) of the network ``method`` needs, read once per helper
    checkpoint; (None, None) for 'cfg'."""
    helper = self.guide_helper(method)
    key = helper and (method, helper.workdir, helper.step)
    if key not in self._helpers:
      if helper is not None:
        logging.info("Guidance %r by %s.", method, helper.describe())
      self._helpers[key] = (guide_networks.load_guide_helper(helper, self.mesh) if helper
                            else (None, None))
    return self._helpers[key]

  def _sample_fn(self, spec: samplers.SamplerSpec, method: str = "cfg",
                 helper: nn.Module | None = None):
    sc = self.config.sample
    key = (spec, method, helper, sc.classifier_model)  # modules compare by their fields
    if key not in self._compiled:
      shape = (self.config.data.image_size,) * 2 + (self.config.data.channels,)
      self._compiled[key] = jit_sample_fn(self.model, self.mesh, spec, shape, self.num_classes,
                                          method, helper, sc.classifier_model)
    return self._compiled[key]

  def sample(self, labels, w, seed: int = 0, sampler: str | None = None,
             num_steps: int | None = None, progress: Callable[[int], None] | None = None,
             first_index: int = 0, guidance_method: str | None = None) -> np.ndarray:
    """uint8 images [N,H,W,C] for ``labels`` [N] at guidance weight(s) ``w`` (scalar or [N]),
    the whole set on every process; ``progress(n)`` is told of every n images made.

    Image i uses noise key fold_in(PRNGKey(seed), first_index + i): the same seeds give
    the same starting noise at every w, and a long request can be made in parts.
    ``guidance_method``: one of guidance.METHODS (default config.sample.guidance).
    """
    out = []
    for _, take, x in self._batches(labels, w, seed, sampler, num_steps, first_index,
                                    guidance_method):
      # Every process gets the whole batch (a no-op on one process).
      out.append(data.to_uint8(multihost_utils.process_allgather(x, tiled=True))[:take])
      if progress:
        progress(take)
    return np.concatenate(out)

  def sample_local(self, labels, w, seed: int = 0, sampler: str | None = None,
                   num_steps: int | None = None,
                   first_index: int = 0,
                   guidance_method: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Like `sample`, but each process keeps only the images its own devices drew:
    (uint8 images [n,H,W,C], their positions in ``labels`` int [n]). Over all processes
    every position appears exactly once; nothing crosses hosts."""
    images, positions = [], []
    for start, take, x in self._batches(labels, w, seed, sampler, num_steps, first_index,
                                        guidance_method):
      shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
      rows = np.concatenate([np.arange(s.index[0].start or 0, s.index[0].stop or x.shape[0])
                             for s in shards])
      keep = rows < take  # drop the padding of a last, partial batch
      local = np.concatenate([np.asarray(s.data) for s in shards])
      images.append(data.to_uint8(local[keep]))
      positions.append(rows[keep] + start)
    return np.concatenate(images), np.concatenate(positions)

  def _batches(self, labels, w, seed: int, sampler: str | None, num_steps: int | None,
               first_index: int, guidance_method: str | None):
    """Yields (start, valid count, sharded images float [batch,H,W,C]) per compiled batch."""
    sc = self.config.sample
    labels = np.asarray(labels, np.int32).reshape(-1)
    w = np.broadcast_to(np.asarray(w, np.float32), labels.shape)
    if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
      bad = labels[(labels < 0) | (labels >= self.num_classes)][0]
      raise ValueError(f"label {bad} is out of range: labels must lie in "
                       f"[0, {self.num_classes}) (the null token {self.num_classes} is "
                       "reached with w = -1).")
    if not np.all(np.isfinite(w)):
      raise ValueError(f"guidance weight must be finite, got {w[~np.isfinite(w)][0]}.")
    spec = samplers.SamplerSpec(sampler or sc.sampler, num_steps or sc.num_steps, sc.fused,
                                self.config.diffusion.logsnr_min,
                                self.config.diffusion.logsnr_max)
    options = samplers.GuidanceOptions.from_config(sc)
    method = guidance_method or sc.guidance
    helper, helper_params = self._helper(method)
    fn = self._sample_fn(spec, method, helper)
    split = NamedSharding(self.mesh, build.BATCH)
    for start in range(0, labels.size, self.batch_size):
      ids = np.arange(start, start + self.batch_size) + first_index
      take = min(self.batch_size, labels.size - start)
      keys = np.asarray(samplers.example_keys(seed, jnp.asarray(ids)))
      batch = [_global(a, split) for a in (keys, _padded(labels, start, self.batch_size),
                                           _padded(w, start, self.batch_size))]
      x, _ = fn((self.params, helper_params), *batch, options)
      yield start, take, x


def _global(values: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from ``values``, which every process holds whole; each device takes
  its slice. (jit refuses numpy inputs with a split sharding across processes.)"""
  return jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])


def _padded(values: np.ndarray, start: int, size: int) -> np.ndarray:
  """values[start:start + size], padded with copies of values[0] to exactly ``size``."""
  chunk = values[start:start + size]
  return np.concatenate([chunk, np.repeat(values[:1], size - len(chunk))])


def image_grid(images: np.ndarray, labels: np.ndarray, class_names: list[str] | None = None,
               scale: int = 2) -> Image.Image:
  """One row per class (in label order), each row's label written on its left."""
  classes = sorted(set(labels.tolist()))
  rows = [images[labels == c] for c in classes]
  per_row = max(len(r) for r in rows)
  h, w = images.shape[1] * scale, images.shape[2] * scale
  margin = 100
  canvas = Image.new("L" if images.shape[-1] == 1 else "RGB",
                     (margin + per_row * (w + 2), len(rows) * (h + 2)), color=255)
  draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
  for r, (c, row) in enumerate(zip(classes, rows, strict=True)):
    name = class_names[c] if class_names and c < len(class_names) else str(c)
    draw.text((4, r * (h + 2) + h // 2 - 6), name, fill=0, font=font)
    for i, img in enumerate(row):
      tile = Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img)
      canvas.paste(tile.resize((w, h), Image.NEAREST), (margin + i * (w + 2), r * (h + 2)))
  return canvas


def write_samples(out_dir: str, w: float, images: np.ndarray, labels: np.ndarray,
                  class_names: list[str] | None, stem: str | None = None) -> tuple[str, str]:
  """OUT_DIR/{stem}.png (labelled grid) and {stem}.npz (images uint8 NHWC, labels);
  the stem defaults to w{w}."""
  png, npz = (str(files.path(out_dir) / f"{stem or f'w{w}'}.{ext}") for ext in ("png", "npz"))
  buffer = io.BytesIO()
  image_grid(images, labels, class_names).save(buffer, format="PNG")
  files.write_atomic(png, buffer.getvalue())
  buffer = io.BytesIO()
  np.savez(buffer, images=images, labels=labels)
  files.write_atomic(npz, buffer.getvalue())
  return png, npz


def _workdir_or_reference_sampler(config: ml_collections.ConfigDict,
                                  workdir: str) -> CheckpointSampler:
  """The workdir's latest checkpoint; with none there, the reference model shipped for
  the config's data (Fashion-MNIST), if the config asks for its network."""
  if not checkpoint.saved_steps(workdir) and reference.available(config.data.name):
    shipped = reference.load(config.data.name)
    same_network = all(shipped.config[k].to_dict() == config[k].to_dict()
                       for k in ("model", "diffusion")) and (
        shipped.config.data.image_size == config.data.image_size)
    if not same_network:  # another network was asked for: no silent substitute
      return CheckpointSampler(config, workdir)
    sampler = CheckpointSampler.from_reference(config.data.name, config.sample, shipped)
    logging.info("No checkpoint in %s: sampling from the shipped reference model %r "
                 "(step %d).", workdir, config.data.name, sampler.step)
    return sampler
  return CheckpointSampler(config, workdir)


def run(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """--mode=sample: for each w, num_per_class images per class with the same seeds (from
  the workdir's latest checkpoint, else the shipped reference model)."""
  sc = config.sample
  sampler = _workdir_or_reference_sampler(config, workdir)
  labels = np.repeat(np.arange(config.data.num_classes), sc.num_per_class).astype(np.int32)
  names = list(sources.FASHION_MNIST_CLASSES) if config.data.name == "fashion_mnist" else None
  written = []
  logging.info("Sampling %d images x %d weights with %s, %d steps, %s guidance, from step %d.",
               labels.size, len(sc.guidance_weights), sc.sampler, sc.num_steps, sc.guidance,
               sampler.step)
  progress = Progress("Sampling", len(sc.guidance_weights) * labels.size)
  stop = preemption.StopAgreement()
  for w in sc.guidance_weights:
    stop.stop_here(f"samples written for {len(written)} of {len(sc.guidance_weights)} weights")
    images = sampler.sample(labels, w, seed=config.seed, progress=progress.advance)
    if jax.process_index() == 0:
      stem = f"w{float(w)}" if sc.guidance == "cfg" else f"{sc.guidance}_w{float(w)}"
      png, _ = write_samples(str(files.path(workdir) / "samples"), float(w), images, labels,
                             names, stem)
      written.append(png)
      logging.info("Wrote %s", png)
  return written
