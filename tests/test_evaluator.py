"""The evaluator's streaming and reductions: one process as before, parts from several
processes merging into the whole, reference statistics computed once per dataset and
weights then read from the cache, and 2 real JAX processes scoring like one.

Features come from a cheap stand-in network (a fixed random projection and softmax), so
these tests check the bookkeeping; tests/test_inception.py checks the Inception itself.

Run as ``python -m tests.test_evaluator WORKER ...`` it is one process of the
multi-process test (see `_worker`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cfgdiff import multihost, sources, tfds_source
from cfgdiff.evaluation import evaluator as ev
from cfgdiff.evaluation import metrics, references

DIM, CLASSES = 6, 5


class FakeFeatures:
  """uint8 images [N, H, W, C] -> (a random projection [N, DIM], softmax of another
  [N, CLASSES]); counts the images it has seen."""

  def __init__(self, pixels: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.project = rng.normal(size=(pixels, DIM))
    self.classify = rng.normal(size=(pixels, CLASSES)) * 4 / np.sqrt(pixels)
    self.images = 0

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    self.images += len(images)
    x = images.reshape(len(images), -1).astype(np.float64) / 255
    logits = x @ self.classify
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return ((x @ self.project).astype(np.float32),
            (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32))


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8),
          rng.integers(0, CLASSES, n).astype(np.int32))


def _evaluator(pr_max_points: int = 12, bootstrap: int = 0) -> ev.Evaluator:
  features = FakeFeatures(4 * 4 * 3)
  real, _ = _images(40, seed=1)
  feats, _ = features(real)
  stats = metrics.GaussianStats(DIM)
  stats.update(feats)
  return ev.Evaluator(features, stats, feats, pr_k=3, pr_max_points=pr_max_points,
                      bootstrap=bootstrap)


def test_one_process_scores_what_it_always_did():
  evaluator = _evaluator()
  images, labels = _images(30, seed=2)
  acc = evaluator.accumulator()
  for start in range(0, 30, 7):
    stop = min(start + 7, 30)
    acc.update(images[start:stop], labels[start:stop], np.arange(start, stop))
  got = acc.result().values
  feats, probs = evaluator.features(images)
  stats = metrics.GaussianStats(DIM)
  stats.update(feats)
  # The streaming sums, the probabilities in arrival order, the first pr_max_points.
  assert got["fid"] == pytest.approx(metrics.fid(stats, evaluator.reference_stats), rel=1e-12)
  assert got["is_mean"] == metrics.inception_score(probs)
  assert (got["precision"], got["recall"]) == metrics.precision_recall(
      evaluator.reference_features[:12], feats[:12], k=3)
  assert got["accuracy"] == metrics.class_accuracy(probs, labels)
  # No bootstrap asked for: no standard errors, never a made-up number.
  assert all(np.isnan(got[f"{m}_se"]) for m in ev.METRICS)


def test_standard_errors_are_the_spread_of_resampled_sets():
  evaluator = _evaluator(pr_max_points=30, bootstrap=50)
  images, labels = _images(30, seed=2)
  acc = evaluator.accumulator()
  acc.update(images, labels, np.arange(30))
  scores = acc.result()
  feats, probs = evaluator.features(images)
  draws = metrics.bootstrap_draws(30, 50)
  # Replicate b is the metric of the resampled set images[draws[b]], recomputed here
  # from scratch for FID, the score and accuracy.
  for b in (0, 17):
    stats = metrics.GaussianStats(DIM)
    stats.update(feats[draws[b]])
    assert scores.replicates["fid"][b] == pytest.approx(
        metrics.fid(stats, evaluator.reference_stats), rel=1e-8)
    assert scores.replicates["is_mean"][b] == pytest.approx(
        metrics.inception_score(probs[np.sort(draws[b])]), rel=1e-12)
    assert scores.replicates["accuracy"][b] == metrics.class_accuracy(probs[draws[b]],
                                                                      labels[draws[b]])
    # Precision: the fraction of resampled samples inside the (fixed) real manifold.
    inside, _ = metrics.manifold_membership(evaluator.reference_features[:30], feats, k=3)
    assert scores.replicates["precision"][b] == pytest.approx(inside[draws[b]].mean())
  for name in ev.METRICS:
    assert scores.values[f"{name}_se"] == pytest.approx(np.std(scores.replicates[name], ddof=1))
    assert scores.values[f"{name}_se"] > 0


def test_fid_error_from_fewer_held_features_is_scaled_to_all_samples():
  # 40 samples drawn, the features of the first 10 held: FID's replicates are those of
  # the 10, their spread scaled by sqrt(10 / 40) around the FID of all 40.
  few, held = _evaluator(pr_max_points=10, bootstrap=40), _evaluator(pr_max_points=40,
                                                                     bootstrap=40)
  images, labels = _images(40, seed=4)
  scored = []
  for evaluator in (few, held):
    acc = evaluator.accumulator()
    acc.update(images, labels, np.arange(40))
    scored.append(acc.result())
  feats, _ = few.features(images)
  reference = metrics.FrechetReference(few.reference_stats.mean, few.reference_stats.cov)
  of_ten = metrics.fid_replicates(feats[:10], metrics.bootstrap_draws(10, 40), reference)
  assert scored[0].values["fid"] == pytest.approx(scored[1].values["fid"], rel=1e-12)
  np.testing.assert_allclose(scored[0].replicates["fid"] - scored[0].values["fid"],
                             (of_ten - of_ten.mean()) * 0.5, rtol=1e-9, atol=1e-9)
  assert scored[0].values["fid_se"] == pytest.approx(0.5 * np.std(of_ten, ddof=1))


def _shares(n: int, chunk: int, processes: int, process: int) -> list[np.ndarray]:
  """Global indices of ``process``'s share of each chunk of n, as a sweep would give."""
  out = []
  for start in range(0, n, chunk):
    lo, hi = multihost.process_share(min(chunk, n - start), process, processes)
    out.append(np.arange(start + lo, start + hi))
  return out


@pytest.mark.parametrize("processes", [2, 3])
def test_parts_from_several_processes_merge_into_the_whole(processes):
  evaluator = _evaluator()
  images, labels = _images(31, seed=3)
  whole = evaluator.accumulator()
  whole.update(images, labels, np.arange(31))
  parts = []
  for p in range(processes):
    acc = evaluator.accumulator()
    for share in _shares(31, 8, processes, p):
      acc.update(images[share], labels[share], share)
    parts.append(acc.local_part())
  assert sum(len(p.order) for p in parts) == 31
  merged = ev.merge_partials(parts, evaluator.pr_max_points)
  np.testing.assert_array_equal(merged.order, np.arange(31))
  np.testing.assert_array_equal(merged.pr_order, np.arange(12))
  got = evaluator.score(merged.stats, merged.probs, merged.labels, merged.pr_features).values
  expected = whole.result().values
  assert got.pop("fid") == pytest.approx(expected.pop("fid"), rel=1e-10)
  assert got == pytest.approx(expected, nan_ok=True)


def test_the_same_index_twice_is_refused():
  # What happens if every process passed all the images instead of its own share.
  evaluator = _evaluator()
  images, labels = _images(6, seed=6)
  acc = evaluator.accumulator()
  acc.update(images, labels, np.arange(6))
  acc.update(images[:3], labels[:3], np.arange(3))
  with pytest.raises(ValueError, match="index 0 was given more than once"):
    acc.result()


def test_class_balanced_pick_takes_classes_in_turn_without_repeats():
  labels = np.random.default_rng(0).integers(0, 3, 100)
  pick = references.class_balanced_pick(labels, 30, 3, seed=1)
  np.testing.assert_array_equal(labels[pick], np.arange(30) % 3)
  assert len(set(pick.tolist())) == 30
  np.testing.assert_array_equal(pick, references.class_balanced_pick(labels, 30, 3, seed=1))
  # No more than the scarcest class allows, still balanced.
  scarcest = np.bincount(labels).min()
  pick = references.class_balanced_pick(labels, 1000, 3, seed=1)
  assert len(pick) == 3 * scarcest and np.all(np.bincount(labels[pick]) == scarcest)


def test_process_shares_cover_everything_in_order():
  for n in (0, 1, 7, 100):
    for count in (1, 2, 3, 8):
      shares = [multihost.process_share(n, p, count) for p in range(count)]
      assert shares[0][0] == 0 and shares[-1][1] == n
      assert all(a[1] == b[0] for a, b in zip(shares[:-1], shares[1:], strict=True))
      assert max(h - l for l, h in shares) - min(h - l for l, h in shares) <= 1


# --- Reference statistics of a real TFDS dataset, cached. ---

@pytest.fixture(scope="module")
def imagenet64(tmp_path_factory):
  from tests import tfds_datasets
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  tfds_datasets.build_imagenet_resized64(data_dir, num_train=24, num_val=16)
  return data_dir


def _imagenet_config(data_dir: str, cache_dir: str):
  from experiments import get_experiment
  config = get_experiment("imagenet64")
  config.data.path = data_dir
  config.sweep.cache_dir = cache_dir
  config.sweep.num_samples, config.sweep.pr_max_points, config.sweep.pr_k = 12, 10, 3
  return config


def test_reference_statistics_are_computed_once_then_read(imagenet64, tmp_path, monkeypatch):
  features = FakeFeatures(64 * 64 * 3)
  digest = {"sha": "ab" * 32}
  monkeypatch.setattr(references, "_inception_features",
                      lambda sweep, weights_dir: (features, digest["sha"], DIM))
  config = _imagenet_config(imagenet64, str(tmp_path / "cache"))
  first = references.make_evaluator(config, config, str(tmp_path / "sweep"))
  assert features.images == 24 + 12  # the whole training split, then the floor
  name = references.reference_cache_name("imagenet_resized/64x64", "train", 64, 24,
                                         digest["sha"], 10)
  assert os.listdir(tmp_path / "cache") == [name]
  # The reference is the whole split; precision/recall use a fixed random subset of it.
  train = tfds_source.TfdsSource("imagenet_resized/64x64", "train", imagenet64, 64)
  all_features, _ = FakeFeatures(64 * 64 * 3)(train.read(np.arange(24))[0])
  np.testing.assert_allclose(first.reference_stats.mean,
                             all_features.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(first.reference_stats.cov,
                             np.cov(all_features.astype(np.float64), rowvar=False),
                             rtol=1e-10, atol=1e-12)
  pr_indices = np.sort(np.random.default_rng(0).permutation(24)[:10])
  np.testing.assert_array_equal(first.reference_features, all_features[pr_indices])
  # The floor: sweep.num_samples validation images, a fixed random subset of the 16.
  validation = tfds_source.TfdsSource("imagenet_resized/64x64", "validation", imagenet64, 64)
  pick = np.sort(np.random.default_rng(1).permutation(16)[:12])
  assert first.floor.pop("num_images") == 12
  assert (first.floor.pop("reference_split"), first.floor.pop("floor_split")) == (
      "train", "validation")
  assert first.floor == pytest.approx(first.evaluate(*validation.read(pick)).values, nan_ok=True)
  assert np.isfinite(first.floor["is_mean"]) and 0 <= first.floor["accuracy"] <= 1

  again = references.make_evaluator(config, config, str(tmp_path / "sweep"))
  assert features.images == 24 + 12 + 12 + 12  # floor only (and the evaluate above)
  np.testing.assert_array_equal(again.reference_stats.outer, first.reference_stats.outer)
  np.testing.assert_array_equal(again.reference_features, first.reference_features)
  assert again.floor.pop("num_images") == 12 and again.floor.pop("floor_split") == "validation"
  again.floor.pop("reference_split")
  assert again.floor == first.floor
  # Other weights: other statistics, computed afresh beside the first.
  digest["sha"] = "cd" * 32
  references.make_evaluator(config, config, str(tmp_path / "sweep"))
  assert features.images == 60 + 24 + 12 and len(os.listdir(tmp_path / "cache")) == 2


def test_a_stale_cache_file_is_recomputed(tmp_path):
  features = FakeFeatures(4 * 4 * 3)
  source = sources.ArraySource(*_images(20, seed=5))
  path = str(tmp_path / "reference.npz")
  stats, _ = references.reference_statistics(source, features, np.arange(5), DIM, path)
  # The same file asked for another subset (a key collision): not trusted.
  _, pr_features = references.reference_statistics(source, features, np.arange(2, 9), DIM, path)
  assert features.images == 40 and pr_features.shape == (7, DIM)
  assert stats.count == 20


# --- Two real JAX processes (jax.distributed over Gloo on this host). ---

def _worker(coordinator: str, processes: int, process: int, cache_dir: str, out: str) -> None:
  """One process: reference statistics (twice: the second read from process 0's cache),
  then 30 generated images split across processes chunk by chunk, scored with their
  global indices, and the floor of real images. Writes its numbers as JSON."""
  import jax
  if processes > 1:
    jax.distributed.initialize(coordinator, processes, process)
  multihost.GATHER_BYTES = 40  # many small all-gathers: the chunked path is what runs
  real, real_labels = _images(40, seed=1)
  features = FakeFeatures(4 * 4 * 3)
  pr_indices = np.sort(np.random.default_rng(0).permutation(40)[:12])
  own_cache = os.path.join(cache_dir, f"process_{process}", "reference.npz")
  real_source = sources.ArraySource(real, real_labels)
  stats, reference = references.reference_statistics(real_source, features, pr_indices, DIM,
                                                     own_cache)
  computed = features.images
  stats2, reference2 = references.reference_statistics(real_source, features, pr_indices,
                                                       DIM, own_cache)
  from_cache = features.images - computed
  evaluator = ev.Evaluator(features, stats, reference, pr_k=3, pr_max_points=12, bootstrap=20)
  images, labels = _images(30, seed=2)
  indexed = evaluator.accumulator()
  mine = [process] if jax.process_count() > 1 else range(2)  # one process plays both
  for p in mine:
    for share in _shares(30, 7, 2, p):
      indexed.update(images[share], labels[share], share)
  result = dict(process_count=jax.process_count(), computed=computed,
                from_cache=from_cache,
                cache_equal=bool(np.array_equal(stats2.outer, stats.outer)
                                 and np.array_equal(reference2, reference)),
                reference_mean=stats.mean.tolist(), reference_count=stats.count,
                reference_features=reference.tolist(), indexed=indexed.result().values,
                floor=evaluator.evaluate(real[:25], real_labels[:25]).values)
  with open(out, "w") as f:
    json.dump(result, f)


def test_two_processes_score_like_one(tmp_path):
  from tests.conftest import ROOT, free_port
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  coordinator = f"127.0.0.1:{free_port()}"

  def start(processes, process, name):
    log = open(tmp_path / f"{name}_{process}.log", "w")  # a file: no pipe can fill up
    return subprocess.Popen(
        [sys.executable, "-m", "tests.test_evaluator", coordinator, str(processes),
         str(process), str(tmp_path / name), str(tmp_path / f"{name}_{process}.json")],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  procs = [start(2, 0, "two"), start(2, 1, "two"), start(1, 0, "one")]
  try:
    for proc in procs:
      proc.wait(timeout=300)
  finally:
    for proc in procs:
      proc.kill()
  for proc, name in zip(procs, ("two_0", "two_1", "one_0"), strict=True):
    assert proc.returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
  two = [json.loads((tmp_path / f"two_{p}.json").read_text()) for p in (0, 1)]
  one = json.loads((tmp_path / "one_0.json").read_text())
  assert [r["process_count"] for r in two] == [2, 2] and one["process_count"] == 1
  # Each process featurized its half of the 40 reference images; the second call read
  # process 0's cache (process 1 has none of its own) and featurized nothing.
  assert [r["computed"] for r in two] == [20, 20] and one["computed"] == 40
  assert all(r["from_cache"] == 0 and r["cache_equal"] for r in two + [one])
  assert not (tmp_path / "two" / "process_1").exists()
  assert two[0] == two[1], "every process must get the same numbers"
  for key in ("indexed", "floor"):
    got, want = dict(two[0][key]), dict(one[key])
    # Float64 sums added in another order: FID agrees to rounding, the rest exactly but
    # FID's standard error, from float32 features of batches split differently.
    assert got.pop("fid") == pytest.approx(want.pop("fid"), rel=1e-9), key
    assert got.pop("fid_se") == pytest.approx(want.pop("fid_se"), rel=1e-6), key
    assert got == pytest.approx(want, rel=1e-12), key
    assert all(np.isfinite(v) for v in got.values()), key
  assert two[0]["reference_count"] == 40
  np.testing.assert_allclose(two[0]["reference_mean"], one["reference_mean"], rtol=1e-12)
  assert two[0]["reference_features"] == one["reference_features"]


if __name__ == "__main__":
  _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
