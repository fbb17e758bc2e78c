"""A small CNN classifier for 28x28 grey images (Fashion-MNIST): the feature network of
the CPU-scale sweep. Its penultimate layer gives FID and precision/recall features, its
softmax the Inception-Score-style score and the accuracy on the requested class.

One classifier ships with cfgdiff, beside the Fashion-MNIST reference model
(``cfgdiff/reference_models/fashion_mnist/classifier.*``, with a manifest: test accuracy,
epochs, the SHA-256 of the training split it saw and of its own file), so every user's FID is
measured with the same instrument, as every FID on ImageNet is measured with the same
Inception, and nobody spends the 2-5 minutes of training it. Other data, other epochs or
``--config.sweep.shipped_classifier=False`` train one on the training split instead,
cached as WORKDIR-level files that record its test accuracy.

  python -m cfgdiff.evaluation.classifier --data_path=/usr/share/datasets/fashion-mnist

trains (or takes from ``--cache_dir``) the classifier and writes the shipped files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from flax import serialization

from cfgdiff import configs, data, files, sources
from cfgdiff.evaluation import batching
from cfgdiff.reference import ShippedModelError

FEATURE_DIM = 128
SHIPPED_DIR = pathlib.Path(__file__).parents[1] / "reference_models" / "fashion_mnist"
SHIPPED_PARAMS = "classifier.msgpack"
SHIPPED_MANIFEST = "classifier.json"


class Classifier(nn.Module):
  """conv32-pool-conv64-pool-conv128-pool-dense128-dense(num_classes).

  Sized by measurement: 92.5% test accuracy on Fashion-MNIST after 4 epochs (2.6 min on
  2 cores). Batch norm and average pools: max-pool gradients cost a third of the step on
  XLA:CPU, and without batch norm 3 epochs reached only 90-91%.
  """
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """x: float32 [B, H, W, C] in [-1, 1] -> (features [B, 128], logits [B, num_classes])."""
    for width in (32, 64, 128):
      x = nn.Conv(width, (3, 3), use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
      x = nn.avg_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    features = nn.relu(nn.Dense(FEATURE_DIM)(x))
    logits = nn.Dense(self.num_classes)(features)
    return features, logits


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int,
                     epochs: int = 4, batch_size: int = 128, seed: int = 0) -> dict:
  """Adam with a cosine decay over ``epochs``; returns the variables (params, batch_stats).

  images: uint8 [N, H, W, C]; labels int [N].
  """
  model = Classifier(num_classes)
  steps_per_epoch = len(images) // batch_size
  optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, epochs * steps_per_epoch))
  variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + images.shape[1:]))
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = optimizer.init(params)

  def step(params, batch_stats, opt_state, x, y, rng):
    def loss_fn(p):
      (_, logits), updates = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                         train=True, rngs={"dropout": rng},
                                         mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, updates["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  split, replicated = batching.local_shardings(batch_size)
  step = jax.jit(step, in_shardings=(replicated,) * 3 + (split, split, replicated),
                 out_shardings=replicated)
  rng, key = np.random.default_rng(seed), jax.random.PRNGKey(seed + 1)
  start = time.time()
  for epoch in range(epochs):
    order = rng.permutation(len(images))
    for i in range(steps_per_epoch):
      idx = np.sort(order[i * batch_size:(i + 1) * batch_size])
      params, batch_stats, opt_state, loss = step(
          params, batch_stats, opt_state, data.to_model_range(images[idx]), labels[idx],
          jax.random.fold_in(key, epoch * steps_per_epoch + i))
    done = (epoch + 1) / epochs
    logging.info("Classifier epoch %d/%d: loss %.3f, ETA %.0f s", epoch + 1, epochs,
                 float(loss), (time.time() - start) * (1 - done) / done)
  return {"params": params, "batch_stats": batch_stats}


class ClassifierFeatures:
  """Features and class probabilities of uint8 images under trained classifier variables."""

  def __init__(self, variables: dict, num_classes: int, batch_size: int = 500):
    model = Classifier(num_classes)
    self.variables, self.batch_size, self.num_classes = variables, batch_size, num_classes

    def apply(variables, x):
      features, logits = model.apply(variables, x)
      return features, jax.nn.softmax(logits)
    split, replicated = batching.local_shardings(batch_size)
    self._apply = jax.jit(apply, in_shardings=(replicated, split), out_shardings=split)

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, H, W, C] -> (features float32 [N, 128], probs float32 [N, K]); N may be 0
    (a process whose devices drew none of a chunk)."""
    empty = (np.zeros((0, FEATURE_DIM), np.float32), np.zeros((0, self.num_classes), np.float32))
    return batching.in_fixed_batches(
        lambda x: self._apply(self.variables, data.to_model_range(x)), images,
        self.batch_size, empty)


def data_digest(images: np.ndarray, labels: np.ndarray) -> str:
  """SHA-256 of the decoded examples (uint8 images, int32 labels): the same data hash the
  same, whatever files or compression they came from."""
  digest = hashlib.sha256(np.ascontiguousarray(images, np.uint8).tobytes())
  digest.update(np.ascontiguousarray(labels, np.int32).tobytes())
  return digest.hexdigest()


def _template(num_classes: int, image_shape: tuple[int, ...]) -> dict:
  return Classifier(num_classes).init(jax.random.PRNGKey(0), jnp.zeros((1,) + image_shape))


def load_shipped(train_digest: str, num_classes: int, epochs: int,
                 image_shape: tuple[int, ...], folder: pathlib.Path = SHIPPED_DIR
                 ) -> tuple[dict, dict] | None:
  """(variables, manifest) of the shipped classifier when it was trained on data hashing
  to ``train_digest`` with these classes and epochs; None when it was not (or none ships).
  Raises ShippedModelError when its file does not match the manifest's SHA-256."""
  manifest_file, params_file = folder / SHIPPED_MANIFEST, folder / SHIPPED_PARAMS
  if not manifest_file.exists():
    return None
  manifest = json.loads(manifest_file.read_text())
  if (manifest["train_data_sha256"], manifest["num_classes"], manifest["epochs"]) != (
      train_digest, num_classes, epochs):
    return None
  blob = params_file.read_bytes() if params_file.exists() else b""
  digest = hashlib.sha256(blob).hexdigest()
  if digest != manifest["sha256"]:
    raise ShippedModelError(
        f"{params_file} is missing or corrupt: its SHA-256 is {digest}, {manifest_file} "
        f"records {manifest['sha256']}. Restore it with `git checkout -- {params_file}` in a "
        "clone (or reinstall cfgdiff), or train one with "
        "--config.sweep.shipped_classifier=False.")
  return serialization.from_bytes(_template(num_classes, image_shape), blob), manifest


def test_accuracy(features: ClassifierFeatures, data_path: str) -> float:
  """Accuracy on the whole test split."""
  test_images, test_labels = sources.load_fashion_mnist(data_path, "test")
  return float(np.mean(np.argmax(features(test_images)[1], 1) == test_labels))


def load_or_train(cache_dir: str, data_path: str, num_classes: int, epochs: int = 4,
                  use_shipped: bool = True) -> tuple[ClassifierFeatures, float]:
  """The evaluation classifier and its test-set accuracy: the one cached in ``cache_dir``
  if any (a run keeps the instrument it started with), else the shipped one if it was
  trained on this training split for ``epochs`` (and ``use_shipped``), else one trained
  now and saved in ``cache_dir``."""
  params_file = files.path(cache_dir) / "classifier.msgpack"
  info_file = files.path(cache_dir) / "classifier.json"
  train_images, train_labels = sources.load_fashion_mnist(data_path, "train")
  if params_file.exists() and info_file.exists():
    template = _template(num_classes, train_images.shape[1:])
    variables = serialization.from_bytes(template, params_file.read_bytes())
    return (ClassifierFeatures(variables, num_classes),
            json.loads(info_file.read_text())["test_accuracy"])

  shipped = use_shipped and load_shipped(data_digest(train_images, train_labels),
                                         num_classes, epochs, train_images.shape[1:])
  if shipped:
    variables, manifest = shipped
    logging.info("Evaluation classifier: the shipped one (%s, SHA-256 %s...).",
                 SHIPPED_DIR / SHIPPED_PARAMS, manifest["sha256"][:12])
    return ClassifierFeatures(variables, num_classes), manifest["test_accuracy"]

  logging.info("Training the evaluation classifier on %d images (cached in %s).",
               len(train_images), cache_dir)
  variables = train_classifier(train_images, train_labels, num_classes, epochs)
  features = ClassifierFeatures(variables, num_classes)
  accuracy = test_accuracy(features, data_path)
  logging.info("Evaluation classifier test accuracy: %.4f", accuracy)
  files.write_atomic(params_file, serialization.to_bytes(variables))
  files.write_atomic(info_file, json.dumps({"test_accuracy": accuracy, "epochs": epochs,
                                            "data_path": data_path}))
  return features, accuracy


def ship(data_path: str, epochs: int, cache_dir: str, command: str,
         folder: pathlib.Path = SHIPPED_DIR) -> dict:
  """Trains the classifier (or reads it from ``cache_dir``, if cached there), writes it and
  its manifest to ``folder``; returns the manifest."""
  from cfgdiff import reference  # pylint: disable=g-import-not-at-top
  num_classes = 10
  info_file = files.path(cache_dir) / "classifier.json"
  if info_file.exists() and json.loads(info_file.read_text())["epochs"] != epochs:
    raise configs.ConfigError(f"{info_file} holds a classifier trained for another number of "
                              f"epochs than --epochs={epochs}; pass another --cache_dir.")
  features, _ = load_or_train(cache_dir, data_path, num_classes, epochs, use_shipped=False)
  blob = serialization.to_bytes(features.variables)
  train_images, train_labels = sources.load_fashion_mnist(data_path, "train")
  manifest = dict(
      epochs=epochs, num_classes=num_classes, test_accuracy=test_accuracy(features, data_path),
      train_data_sha256=data_digest(train_images, train_labels),
      sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob), command=command,
      commit=reference.commit())
  folder.mkdir(parents=True, exist_ok=True)
  files.write_atomic(str(folder / SHIPPED_PARAMS), blob)
  files.write_atomic(str(folder / SHIPPED_MANIFEST), json.dumps(manifest, indent=2) + "\n")
  return manifest


def main() -> None:
  parser = argparse.ArgumentParser(description="Writes the shipped evaluation classifier.")
  parser.add_argument("--data_path", default=configs.default_config().data.path)
  parser.add_argument("--epochs", type=int, default=4)
  parser.add_argument("--cache_dir", default="workdir/classifier",
                      help="reused if it holds a classifier trained for --epochs")
  args = parser.parse_args()
  command = ("python -m cfgdiff.evaluation.classifier "
             f"--data_path={args.data_path} --epochs={args.epochs}")
  print(json.dumps(ship(args.data_path, args.epochs, args.cache_dir, command), indent=2))


if __name__ == "__main__":
  main()
