"""Images/s one host's input pipeline delivers, against what a TPU v4-32 host consumes.

  python -m benchmarks.input_throughput [--workers 0,1,2] [--data_dir DIR]

Reads real ArrayRecord datasets that TFDS builds here (tests/tfds_datasets.py), through
the training code (tfds_source.TfdsSource and data.make_pipeline, random flips on), as process 0
of 4 (a v4-32 slice has 4 hosts):

- ImageNet 64: `imagenet_resized/64x64`, 64x64 PNGs as TFDS stores them, 512 per host step.
- ImageNet 128: `imagenet2012`, 500x375 JPEGs of about 100 KB (real ImageNet averages about
  110 KB), decoded and centre-cropped to 128 as ADM does, 64 per host step.

The rate a host needs is its 4 chips' share of the compute plan: dense bf16 peak of a v4
chip (benchmarks/compute_plan.py) x 40% utilisation / (3 x the forward GFLOPs per image of
README's model-size table). Each row also times the training thread: steps that first
sleep for a v4-32 step time (the CPU is free while the TPU computes), then take the next
batch; the wait is what the input adds to every step. Records its table in benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

V4_32_HOSTS = 4  # a v4-32 slice: 16 chips (32 TensorCores), 4 chips per host
V4_CHIPS_PER_HOST = 4
UTILISATION = 0.4  # README's compute plan
# Forward GFLOPs per image, bf16 (README "Model size", from python -m benchmarks.model_size).
FORWARD_GFLOPS = {"imagenet64": 212.2, "imagenet128": 601.8}
HOST_BATCH = {"imagenet64": 2048 // V4_32_HOSTS, "imagenet128": 256 // V4_32_HOSTS}


def needed_per_host(experiment: str) -> float:
  """Images/s a v4-32 host must deliver to keep its chips at the planned utilisation."""
  from benchmarks.compute_plan import PEAK_TFLOPS  # pylint: disable=g-import-not-at-top
  chip = PEAK_TFLOPS["TPU v4"] * 1e12 * UTILISATION / (3 * FORWARD_GFLOPS[experiment] * 1e9)
  return V4_CHIPS_PER_HOST * chip


def build_datasets(data_dir: str) -> None:
  """Builds both datasets into ``data_dir`` unless they are there already."""
  from tests import tfds_datasets  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(os.path.join(data_dir, "imagenet_resized")):
    tfds_datasets.build_imagenet_resized64(data_dir, num_train=4096, num_val=16,
                                           num_classes=64)
  if not os.path.isdir(os.path.join(data_dir, "imagenet2012")):
    tfds_datasets.build_imagenet2012(data_dir, num_classes=8, per_class=64, num_val=4,
                                     texture=24.0, sizes=((500, 375),))


def measure(experiment: str, data_dir: str, workers: int, steps: int) -> dict:
  """Over ``steps`` host batches each, after a warm-up batch (which starts the workers):

  - images/s when batches are taken as fast as they come (the pipeline's throughput);
  - the seconds the training thread waits in next() per step when each step first spends
    a v4-32 step time away from the CPU (sleeping, as while the TPU computes).
  """
  from cfgdiff import data, tfds_source  # pylint: disable=g-import-not-at-top
  name, size = (("imagenet_resized/64x64", 64) if experiment == "imagenet64"
                else ("imagenet2012", 128))
  source = tfds_source.TfdsSource(name, "train", data_dir, size)
  batch = HOST_BATCH[experiment]
  step_time = batch / needed_per_host(experiment)
  start = time.perf_counter()
  with data.make_pipeline(source, batch * V4_32_HOSTS, seed=0, process_index=0,
                          process_count=V4_32_HOSTS, num_workers=workers,
                          random_flip=True) as pipeline:
    first = next(pipeline)
    assert first["image"].shape == (batch, size, size, 3), first["image"].shape
    warm = time.perf_counter()
    for _ in range(steps):
      next(pipeline)
    seconds = time.perf_counter() - warm
    waited = 0.0
    for _ in range(steps):
      time.sleep(step_time)
      t = time.perf_counter()
      next(pipeline)
      waited += time.perf_counter() - t
  return {"images_per_s": steps * batch / seconds, "s_per_batch": seconds / steps,
          "first_batch_s": warm - start, "step_s": step_time, "wait_s": waited / steps}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--steps64", type=int, default=8, help="host batches of 512 timed")
  parser.add_argument("--steps128", type=int, default=16, help="host batches of 64 timed")
  parser.add_argument("--data_dir", default="", help="keep the built datasets here")
  args = parser.parse_args()
  from benchmarks import common  # pylint: disable=g-import-not-at-top

  data_dir = args.data_dir or tempfile.mkdtemp(prefix="cfgdiff_input_")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  t = time.perf_counter()
  build_datasets(data_dir)
  print(f"datasets ready in {data_dir} ({time.perf_counter() - t:.0f} s)", flush=True)
  model, vector = common.cpu_description()
  rows = []
  try:
    for experiment, steps in (("imagenet64", args.steps64), ("imagenet128", args.steps128)):
      need = needed_per_host(experiment)
      for workers in (int(w) for w in args.workers.split(",")):
        load = os.getloadavg()[0]
        result = measure(experiment, data_dir, workers, steps)
        stored = "64x64 PNG" if experiment == "imagenet64" else "500x375 JPEG -> 128"
        rows.append([experiment, stored, HOST_BATCH[experiment], workers,
                     f"{result['images_per_s']:.0f}", f"{result['s_per_batch']:.3f}",
                     f"{result['first_batch_s']:.1f}", f"{need:.0f}",
                     f"{result['images_per_s'] / need:.2f}", f"{result['step_s']:.3f}",
                     f"{result['wait_s']:.3f}", f"{load:.1f}", model, vector])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
  finally:
    if not args.data_dir:
      shutil.rmtree(data_dir, ignore_errors=True)
  common.record(
      "Input pipeline: images/s per host against a TPU v4-32 host's need",
      f"python -m benchmarks.input_throughput --workers {args.workers}",
      ["experiment", "stored images", "host batch", "workers", "images/s", "s/batch",
       "first batch s", "needed images/s per v4-32 host", "delivered / needed",
       "v4-32 step s", "training-thread wait s/step", "load avg before", "CPU",
       "vector extensions"], rows)


if __name__ == "__main__":
  main()
