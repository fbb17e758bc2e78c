"""The networks that guide beside the denoiser: which one a method needs, checked, read, bound.

Classifier-free guidance needs none; classifier guidance needs the noisy classifier of
sample.classifier_workdir; autoguidance a weaker denoiser (sample.weak_workdir and
weak_step). `resolve_guide_helper` checks the choice against the sampled model before
anything is read or compiled, `load_guide_helper` reads it, and `make_guide` binds the
networks into the `guidance.Guide` the samplers call.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_collections
from flax import linen as nn
from jax.sharding import Mesh

from cfgdiff import build, checkpoint, configs, files, guidance
from cfgdiff.models import classifier as classifier_net


def make_guide(method: str, model: nn.Module, params, helper: nn.Module | None, helper_params,
               null_label: int, fused: bool = False,
               classifier_model: str = "conditional") -> guidance.Guide:
  """The `guidance.Guide` of ``method`` for the denoiser ``model`` with ``params``.

  ``helper``: the noisy classifier (method 'classifier') or the weak denoiser ('auto'),
  with ``helper_params``; None for 'cfg'. ``classifier_model``: the denoiser classifier
  guidance starts from, 'conditional' (the label, as ADM-G) or 'unconditional' (null).
  """
  eps_fn = lambda z, l, y: model.apply({"params": params}, z, l, y)
  if method == "cfg":
    return guidance.classifier_free(eps_fn, null_label, fused)
  if method == "classifier":
    log_prob = lambda z, l, y: classifier_net.log_prob(
        helper.apply({"params": helper_params}, z, l), y)
    return guidance.classifier(eps_fn, log_prob,
                               None if classifier_model == "conditional" else null_label)
  if method == "auto":
    weak = lambda z, l, y: helper.apply({"params": helper_params}, z, l, y)
    return guidance.autoguidance(eps_fn, weak)
  raise ValueError(f"guidance method {method!r} does not exist; choose one of "
                   f"{guidance.METHODS}.")


def _same_data(ours: ml_collections.ConfigDict, theirs: ml_collections.ConfigDict) -> str:
  """'' when both configs model the same data; else what differs, for an error."""
  keys = ("name", "image_size", "channels", "num_classes")
  differ = [f"data.{k} {theirs.data[k]!r} (not {ours.data[k]!r})" for k in keys
            if ours.data[k] != theirs.data[k]]
  return ", ".join(differ)


class GuideHelper(NamedTuple):
  """The network a guidance method needs beside the denoiser, before it is read."""

  config: ml_collections.ConfigDict  # the config it was trained with
  workdir: str
  step: int  # the checkpoint step that is read

  def describe(self) -> str:
    return f"{self.workdir} step {self.step}"


def resolve_guide_helper(config: ml_collections.ConfigDict, workdir: str | None,
                         method: str | None = None,
                         main_step: int | None = None) -> GuideHelper | None:
  """Which network ``method`` (default config.sample.guidance) needs beside the denoiser
  of ``workdir``, checked before anything is read or compiled: None for 'cfg'.

  'classifier': the noisy classifier of sample.classifier_workdir (--mode=train_classifier
  of the same data), its latest step. 'auto': checkpoint sample.weak_step of
  sample.weak_workdir (this workdir when ''; its latest step when 0), a weaker denoiser of
  the same data and schedule, earlier than ``main_step`` when it is this workdir's.

  Raises:
    configs.ConfigError: the workdir is missing, or trained for something else.
  """
  sc = config.sample
  method = method or sc.guidance
  if method == "cfg":
    return None
  if method not in guidance.METHODS:
    raise configs.ConfigError(f"guidance method {method!r} does not exist; choose one of "
                              f"{guidance.METHODS}.")
  if method == "classifier":
    if not sc.classifier_workdir:
      raise configs.ConfigError(
          "classifier guidance needs sample.classifier_workdir: the workdir of "
          "--mode=train_classifier with this config (it trains the noisy classifier).")
    helper_config = _trained_config(sc.classifier_workdir, "sample.classifier_workdir")
    if helper_config.model.kind != "noisy_classifier":
      raise configs.ConfigError(
          f"sample.classifier_workdir={sc.classifier_workdir!r} holds a "
          f"{helper_config.model.kind!r} model, not a noisy classifier; train one with "
          "--mode=train_classifier and point sample.classifier_workdir at its workdir.")
    differ = _same_data(config, helper_config)
    if differ:
      raise configs.ConfigError(
          f"the classifier in {sc.classifier_workdir} was trained for {differ}: train a "
          "classifier on this config's data with --mode=train_classifier.")
    return GuideHelper(helper_config, sc.classifier_workdir,
                       _step_to_read(sc.classifier_workdir, 0, "sample.classifier_workdir"))
  weak_workdir = sc.weak_workdir or workdir
  if not weak_workdir:
    raise configs.ConfigError("autoguidance needs sample.weak_workdir (a smaller "
                              "model's workdir) when sampling a shipped model.")
  if not sc.weak_workdir and not sc.weak_step:
    raise configs.ConfigError(
        "autoguidance with sample.weak_workdir='' guides by an earlier checkpoint "
        "of this workdir: set sample.weak_step to one of "
        f"{checkpoint.saved_steps(weak_workdir)}, or sample.weak_workdir to a smaller run.")
  helper_config = _trained_config(weak_workdir, "sample.weak_workdir")
  differ = _same_data(config, helper_config)
  schedule = ("logsnr_min", "logsnr_max")
  differ += ", ".join(f"diffusion.{k} {helper_config.diffusion[k]} (not {config.diffusion[k]})"
                      for k in schedule if helper_config.diffusion[k] != config.diffusion[k])
  if helper_config.model.kind != "unet" or differ:
    raise configs.ConfigError(
        f"the weak model in {weak_workdir} is {helper_config.model.kind!r} on "
        f"{differ or 'the same data'}: autoguidance needs a denoiser of the same data and "
        "noise schedule (an earlier checkpoint of this run, or a smaller network trained "
        "by the same command).")
  step = _step_to_read(weak_workdir, sc.weak_step, "sample.weak_step")
  if weak_workdir == workdir and main_step is not None and step >= main_step:
    raise configs.ConfigError(
        f"sample.weak_step={step} is not earlier than the sampled step {main_step}: "
        "autoguidance needs a weaker model.")
  return GuideHelper(helper_config, weak_workdir, step)


def load_guide_helper(helper: GuideHelper, mesh: Mesh) -> tuple[nn.Module, Any]:
  """(module, EMA parameters) of a resolved `GuideHelper`, read onto ``mesh``."""
  params, _ = checkpoint.load_ema_params(helper.config, helper.workdir, mesh, helper.step)
  return build.make_model(helper.config), params


def _step_to_read(workdir: str, step: int, key: str) -> int:
  """``step`` if ``workdir`` saved it, its latest step when 0; else a ConfigError."""
  saved = checkpoint.saved_steps(workdir)
  if not saved:
    raise configs.ConfigError(f"{workdir} has no checkpoint yet: train it first.")
  if step and step not in saved:
    raise configs.ConfigError(f"{key}={step} is not a checkpoint of {workdir}; it has "
                              f"{saved}.")
  return step or saved[-1]


def _trained_config(workdir: str, key: str) -> ml_collections.ConfigDict:
  path = files.path(workdir) / "config.json"
  if not path.exists():
    raise configs.ConfigError(f"{key}={workdir!r} is not a trained workdir (no config.json "
                              "there): train it first, or fix the path.")
  return configs.from_json(str(path))
