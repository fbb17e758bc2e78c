"""A small CNN classifier for 28x28 grey images (Fashion-MNIST): the feature network of
the CPU-scale sweep. Its penultimate layer gives FID and precision/recall features, its
softmax the Inception-Score-style score and the accuracy on the requested class.

Trained once on the training split and cached as WORKDIR-level files; the cache records
its test accuracy so every result can say how trustworthy the evaluator is.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from flax import serialization

from cfgdiff import data, files
from cfgdiff.evaluation import batching

FEATURE_DIM = 128


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


def load_or_train(cache_dir: str, data_path: str, num_classes: int,
                  epochs: int = 4) -> tuple[ClassifierFeatures, float]:
  """The cached classifier in ``cache_dir`` (trained and saved there on first use) and its
  test-set accuracy."""
  params_file = files.path(cache_dir) / "classifier.msgpack"
  info_file = files.path(cache_dir) / "classifier.json"
  train_images, train_labels = data.load_fashion_mnist(data_path, "train")
  template = Classifier(num_classes).init(jax.random.PRNGKey(0),
                                          jnp.zeros((1,) + train_images.shape[1:]))
  if params_file.exists() and info_file.exists():
    variables = serialization.from_bytes(template, params_file.read_bytes())
    return (ClassifierFeatures(variables, num_classes),
            json.loads(info_file.read_text())["test_accuracy"])

  logging.info("Training the evaluation classifier on %d images (cached in %s).",
               len(train_images), cache_dir)
  variables = train_classifier(train_images, train_labels, num_classes, epochs)
  features = ClassifierFeatures(variables, num_classes)
  test_images, test_labels = data.load_fashion_mnist(data_path, "test")
  accuracy = float(np.mean(np.argmax(features(test_images)[1], 1) == test_labels))
  logging.info("Evaluation classifier test accuracy: %.4f", accuracy)
  files.write_atomic(params_file, serialization.to_bytes(variables))
  files.write_atomic(info_file, json.dumps({"test_accuracy": accuracy, "epochs": epochs,
                                            "data_path": data_path}))
  return features, accuracy
