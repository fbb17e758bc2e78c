"""Evaluation cost: feature networks' images/s and memory, and the metrics' time.

  python -m benchmarks.eval_throughput [--images 200]

FID Inception (Flax port, real default_1.pt weights, 299x299 after resize) on 64x64 RGB
inputs, the Fashion-MNIST classifier on 28x28 inputs, and FID + precision/recall on
feature sets of the evaluated size. Records its table in benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def _rate(fn, images: np.ndarray) -> float:
  fn(images[:1])  # compile
  t0 = time.perf_counter()
  fn(images)
  return len(images) / (time.perf_counter() - t0)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--images", type=int, default=200)
  parser.add_argument("--no-write", action="store_true")
  args = parser.parse_args()

  import jax

  from benchmarks import common
  from cfgdiff.evaluation import classifier, inception, inception_weights, metrics

  rng = np.random.default_rng(0)
  rows = []
  features = inception.InceptionFeatures(inception_weights.load_fid_inception())
  rgb = rng.integers(0, 256, (args.images, 64, 64, 3), dtype=np.uint8)
  rows.append(["FID Inception (Flax), batch 50", f"{_rate(features, rgb):.1f} images/s"])
  model = classifier.Classifier(10)
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1), np.float32))
  grey = rng.integers(0, 256, (10 * args.images, 28, 28, 1), dtype=np.uint8)
  rows.append(["Fashion-MNIST classifier, batch 500",
               f"{_rate(classifier.ClassifierFeatures(variables, 10), grey):.0f} images/s"])
  for n, dim in ((10_000, 2048), (10_000, 128)):
    a, b = rng.normal(size=(n, dim)), rng.normal(size=(n, dim))
    t0 = time.perf_counter()
    sa, sb = metrics.GaussianStats(dim), metrics.GaussianStats(dim)
    sa.update(a)
    sb.update(b)
    metrics.fid(sa, sb)
    fid_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics.precision_recall(a.astype(np.float32), b.astype(np.float32))
    rows.append([f"FID / precision-recall, {n} x {dim}-d features",
                 f"{fid_s:.1f} s / {time.perf_counter() - t0:.1f} s"])
  rows.append(["peak RSS of this process",
               f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"])
  for row in rows:
    print(" | ".join(row))
  if not args.no_write:
    common.record("Evaluation cost", "python -m benchmarks.eval_throughput "
                          f"--images {args.images}", ["what", "measured"], rows)


if __name__ == "__main__":
  main()
