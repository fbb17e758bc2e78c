"""The noisy classifier's held-out accuracy by noise level: what classifier guidance can
lean on at each log-SNR (guided-diffusion never reports it).

For each log-SNR l in classifier.eval_logsnrs, the held-out images x are noised to
z_l = alpha_l x + sigma_l eps (the same eps at every l) and classified. The result is
written to WORKDIR/classifier_eval.json when --mode=train_classifier finishes.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cfgdiff import build, data, files, schedule, sources
from cfgdiff.models import classifier as classifier_net

EVAL_FILE = "classifier_eval.json"
_BATCH = 250


def held_out_accuracy(config: ml_collections.ConfigDict, params, step: int) -> dict:
  """{"split", "examples", "step", "logsnr": [...], "accuracy": [...], "loss": [...]}:
  top-1 accuracy and mean cross-entropy (nats) of the classifier ``params`` on the first
  classifier.eval_examples images of the held-out split, at each classifier.eval_logsnrs."""
  split = sources.open_split(config.data, "held_out")
  count = min(config.classifier.eval_examples, len(split.source))
  images, labels = split.source.read(np.arange(count))
  model = build.make_model(config)

  @jax.jit
  def evaluate(x, y, eps, logsnr):
    l = jnp.full((x.shape[0],), logsnr)
    logits = model.apply({"params": params}, schedule.diffuse(x, eps, l), l)
    return jnp.sum(jnp.argmax(logits, -1) == y), -jnp.sum(classifier_net.log_prob(logits, y))

  noise = np.random.default_rng([config.seed, 0x6576616C]).standard_normal(
      images.shape).astype(np.float32)
  accuracy, loss = [], []
  for logsnr in config.classifier.eval_logsnrs:
    right = total_loss = 0.0
    for start in range(0, count, _BATCH):
      part = slice(start, start + _BATCH)
      r, nll = evaluate(data.to_model_range(images[part]), labels[part], noise[part],
                        float(logsnr))
      right, total_loss = right + float(r), total_loss + float(nll)
    accuracy.append(right / count)
    loss.append(total_loss / count)
  return {"split": split.name, "examples": count, "step": step,
          "logsnr": [float(l) for l in config.classifier.eval_logsnrs],
          "accuracy": accuracy, "loss": loss}


def table(result: dict) -> str:
  """The result as a Markdown table, one row per log-SNR."""
  lines = [f"Held-out accuracy of the noisy classifier (split {result['split']!r}, "
           f"{result['examples']} images, step {result['step']}):", "",
           "| log-SNR | sigma | accuracy | cross-entropy (nats) |", "|---|---|---|---|"]
  for l, acc, nll in zip(result["logsnr"], result["accuracy"], result["loss"], strict=True):
    sigma = float(np.sqrt(1.0 / (1.0 + np.exp(l))))
    lines.append(f"| {l:g} | {sigma:.3f} | {acc:.3f} | {nll:.3f} |")
  return "\n".join(lines)


def write(workdir: str, result: dict) -> str:
  """WORKDIR/classifier_eval.json; returns its path."""
  path = files.path(workdir) / EVAL_FILE
  files.write_atomic(str(path), json.dumps(result, indent=1).encode())
  return str(path)
