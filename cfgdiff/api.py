"""The Python API: a trained model in one line, guided samples in the next.

    import cfgdiff
    model = cfgdiff.load("fashion_mnist")        # a shipped model, a workdir or a checkpoint path
    images = model.sample(classes=[3] * 8, w=1.0, steps=32, seed=0)   # uint8 [8, 28, 28, 1]

`w` is the paper's guidance weight (w = 0: the conditional model; other tools' scale is
s = 1 + w). Every sampler option is a keyword; a request compiles a batch no larger than
itself (rounded up to the device count), once per sampler, step count and batch.

`guided_sample` runs the same samplers over your own network: any
``eps_fn(z [B,H,W,C], logsnr [B], labels [B]) -> eps [B,H,W,C]`` trained with a null label.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cfgdiff import configs, guidance, reference, samplers, sampling, sources


class ModelNotFoundError(LookupError):
  """`load` found no workdir, checkpoint or shipped model under the name it was given."""


class Model:
  """A trained classifier-free guidance model, ready to sample (see `load`).

  Attributes:
    config: the config it was trained with (ml_collections).
    step: the training step of its EMA parameters.
    class_names: the data's class names where known (Fashion-MNIST, an image folder, a TFDS
      dataset), else None; `sample` accepts them in place of class indices.
  """

  def __init__(self, sampler: sampling.CheckpointSampler, class_names: list[str] | None):
    self._sampler = sampler
    self.config, self.step, self.class_names = sampler.config, sampler.step, class_names

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of a sample."""
    dc = self.config.data
    return (dc.image_size, dc.image_size, dc.channels)

  def labels(self, classes: Sequence[int | str]) -> np.ndarray:
    """int32 [N] class indices for ``classes`` (indices or class names)."""
    out = []
    for c in classes:
      if isinstance(c, str):
        if not self.class_names or c not in self.class_names:
          raise ValueError(f"unknown class name {c!r}; the classes are "
                           f"{self.class_names or list(range(self.config.data.num_classes))}.")
        out.append(self.class_names.index(c))
      else:
        out.append(int(c))
    return np.asarray(out, np.int32)

  def sample(self, classes: Sequence[int | str], w: float | Sequence[float] = 0.0, *,
             steps: int | None = None, seed: int = 0, sampler: str | None = None,
             v: float | None = None, interval: tuple[float, float] | None = None,
             rescale: float | None = None, threshold: float | None = None,
             clip_x: bool | None = None, fused: bool | None = None,
             guidance: str | None = None, classifier_workdir: str | None = None,
             classifier_model: str | None = None, weak_workdir: str | None = None,
             weak_step: int | None = None) -> np.ndarray:
    """uint8 images [N, H, W, C], one per entry of ``classes``.

    Args:
      classes: N class indices or names.
      w: the guidance weight, one for all or N of them (traced: no recompile).
      steps: sampling steps (default: the config's sample.num_steps).
      seed: image i starts from the noise of fold_in(PRNGKey(seed), i), at any w.
      sampler: "ancestral" (the paper's), "ddim", "dpmpp_2m", ... (`samplers.names()`).
      v: the ancestral sampler's variance interpolation (paper: 0.3 at 64x64).
      interval: (lo, hi) log-SNR range where guidance applies; outside, conditional only.
      rescale: CFG rescale factor in [0, 1] (0: off). threshold: dynamic-thresholding
        percentile in [0, 1) (0: off). clip_x: clip x~ to [-1, 1] at each step.
      fused: evaluate the conditional and unconditional passes as one 2N batch.
      guidance: "cfg" (classifier-free, the default), "classifier" (``w`` is the
        classifier scale; needs ``classifier_workdir``, a --mode=train_classifier
        workdir, and starts from the ``classifier_model`` "conditional" or
        "unconditional") or "auto" (autoguidance by checkpoint ``weak_step`` of
        ``weak_workdir``, a weaker model of the same data; '' = this workdir).
    Unset options keep the config's sample.* values.
    """
    labels = self.labels(classes)
    sc = self.config.sample
    traced = dict(v=v, interval=interval, rescale=rescale, threshold=threshold,
                  clip_x=clip_x)  # keywords named for configs.TRACED_SAMPLE_OPTIONS' fields
    chosen = {"sampler": sampler, "num_steps": steps, "fused": fused, "guidance": guidance,
              "classifier_workdir": classifier_workdir, "classifier_model": classifier_model,
              "weak_workdir": weak_workdir, "weak_step": weak_step,
              **{o.key: traced[o.field] for o in configs.TRACED_SAMPLE_OPTIONS}}
    chosen = {k: value for k, value in chosen.items() if value is not None}
    saved = {k: sc[k] for k in chosen}
    devices = jax.device_count()
    saved_batch = self._sampler.batch_size
    try:
      sc.update(chosen)
      configs.validate_sample(sc)
      # A small request pays for its own batch, not the config's (40 for Fashion-MNIST).
      self._sampler.batch_size = min(saved_batch, -(-max(labels.size, 1) // devices) * devices)
      return self._sampler.sample(labels, w, seed=seed)
    finally:
      sc.update(saved)
      self._sampler.batch_size = saved_batch


def _class_names(config) -> list[str] | None:
  """The data's class names, where known and as many as the model's classes."""
  if config.data.name == sources.FASHION_MNIST:
    names = list(sources.FASHION_MNIST_CLASSES)
  else:
    try:  # the data, where this machine has it
      names = list(sources.open_split(config.data, "train").source.class_names)
    except Exception:  # pylint: disable=broad-except
      return None
  return names if len(names) == config.data.num_classes else None


def load(source: str = "fashion_mnist", step: int | None = None) -> Model:
  """A model to sample from: a shipped reference model's name (`reference`), a workdir
  (its latest checkpoint, or ``step``), or a checkpoint folder (WORKDIR/checkpoints/STEP).

  Raises:
    ModelNotFoundError: nothing loadable at ``source``; the message lists what is.
    reference.ShippedModelError: a shipped model's files are damaged.
  """
  if os.path.isdir(os.path.join(source, "state")) and os.path.basename(
      os.path.dirname(os.path.normpath(source))) == "checkpoints":
    workdir = os.path.dirname(os.path.dirname(os.path.normpath(source)))
    step = int(os.path.basename(os.path.normpath(source)))
  else:
    workdir = source
  if os.path.isfile(os.path.join(workdir, "config.json")):
    config = configs.from_json(os.path.join(workdir, "config.json"))
    return Model(sampling.CheckpointSampler(config, workdir, step), _class_names(config))
  if reference.available(source):
    shipped = reference.load(source)
    return Model(sampling.CheckpointSampler.from_reference(source, shipped=shipped),
                 _class_names(shipped.config))
  shipped = sorted(p.name for p in reference.ROOT.iterdir()) if reference.ROOT.is_dir() else []
  raise ModelNotFoundError(
      f"{source!r} is neither a workdir (no config.json), a checkpoint folder "
      f"(WORKDIR/checkpoints/STEP) nor a shipped model ({shipped}).")


def guided_sample(eps_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                  labels: Sequence[int], w: float | Sequence[float],
                  image_shape: tuple[int, int, int], null_label: int, *, seed: int = 0,
                  sampler: str = "ancestral", steps: int = 256,
                  logsnr_range: tuple[float, float] = (-20.0, 20.0), fused: bool = False,
                  **options) -> jax.Array:
  """Classifier-free guided samples from your own network, jitted.

  Args:
    eps_fn: (z [B,H,W,C], logsnr [B], labels [B]) -> eps [B,H,W,C]; ``null_label`` is the
      label it was trained with for "no class".
    labels: B class indices in [0, null_label). w: one weight or B of them.
    image_shape: (H, W, C). seed, sampler, steps, fused: as `Model.sample`.
    logsnr_range: (l_min, l_max) of the noise schedule the network was trained on.
    **options: v, interval, rescale, threshold, clip_x (`samplers.GuidanceOptions`).
  Returns:
    float32 [B, H, W, C] samples in the data's units (x~ of the last step).

  With a Flax module: ``eps_fn = lambda z, l, y: module.apply({"params": params}, z, l, y)``.
  """
  labels = jnp.asarray(labels, jnp.int32)
  w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), labels.shape)
  spec = samplers.SamplerSpec(sampler, steps, fused, *logsnr_range)
  keys = samplers.example_keys(seed, jnp.arange(labels.shape[0]))
  guide = guidance.classifier_free(eps_fn, null_label, fused)
  run = jax.jit(lambda k, y, ws, o: samplers.sample(guide, k, y, ws, tuple(image_shape), spec,
                                                    o)[0])
  return run(keys, labels, w, samplers.GuidanceOptions.create(**options))
