"""Input pipelines. Batches are a pure function of (seed, step), so the data position
is just the step: resuming at step s yields exactly the batches an uninterrupted run sees.

Each process reads only its own slice of every global batch (multi-host). Sources: the
Fashion-MNIST IDX files in memory (`ArraySource`), or a TFDS dataset prepared as ArrayRecord
(`TfdsSource`, with one-line errors for anything else). `make_pipeline` computes the batches
ahead in grain worker processes; `Batcher.batch(step)` is the function they all compute.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import signal
import struct

import numpy as np
from PIL import Image

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")


class DataError(RuntimeError):
  """Missing or malformed input data; the message says how to fix it."""


def read_idx(path: str) -> np.ndarray:
  """Reads a (optionally gzipped) IDX file of unsigned bytes into a uint8 array."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number).")
  ndim = data[3]
  shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise DataError(f"{path} is truncated: header says {shape}, found {array.size} bytes.")
  return array.reshape(shape)


def load_fashion_mnist(path: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """Loads Fashion-MNIST from Debian's IDX files.

  Returns:
    images uint8 [N, 28, 28, 1] and labels int32 [N].
  """
  image_file, label_file = (os.path.join(path, name) for name in FASHION_MNIST_FILES[split])
  for file in (image_file, label_file):
    if not os.path.exists(file):
      raise DataError(f"Fashion-MNIST file {file} not found. Install the data with "
                      f"`{FASHION_MNIST_INSTALL}` or set --config.data.path to the folder "
                      "holding the IDX files.")
  images, labels = read_idx(image_file), read_idx(label_file)
  if images.shape[0] != labels.shape[0]:
    raise DataError(f"{image_file} and {label_file} hold different numbers of examples.")
  return images[..., None], labels.astype(np.int32)


def to_model_range(images_uint8: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images_uint8.astype(np.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255] (clipped, rounded)."""
  return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


@dataclasses.dataclass
class ArraySource:
  """Examples held in memory: images uint8 [N, H, W, C] and labels int32 [N]."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.images)

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]

  def fingerprint(self) -> dict:
    """The example count and a SHA-256 of every label and pixel (a resumed run checks it)."""
    digest = hashlib.sha256(np.ascontiguousarray(self.labels).tobytes())
    digest.update(np.ascontiguousarray(self.images).tobytes())
    return {"examples": len(self), "sha256": digest.hexdigest()}


TFDS_DATASETS = ("imagenet_resized/64x64", "imagenet2012")
# How README tells users to prepare a dataset as ArrayRecord (what tfds.data_source reads).
# `tfds build NAME --data_dir=DIR --file_format=array_record` does the same, but the `tfds`
# command of tensorflow-datasets 4.9.10 does not start without apache-beam installed.
TFDS_PREPARE = ("python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
                "data_dir='{data_dir}', file_format='array_record').download_and_prepare()\"")
TFDS_BUILD = "tfds build {name} --data_dir={data_dir} --file_format=array_record"
TFDS_CONVERT = ("tfds convert_format --dataset_version_dir={path} "
                "--out_file_format=array_record")


def tfds_help(name: str, data_dir: str) -> str:
  """How to prepare TFDS dataset ``name`` in ``data_dir`` as ArrayRecord, in one line."""
  data_dir = data_dir or "DIR"
  manual = (f"; ImageNet 2012 needs ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
            f"{data_dir}/downloads/manual first" if name == "imagenet2012" else "")
  prepare = TFDS_PREPARE.format(name=name, data_dir=data_dir)
  build = TFDS_BUILD.format(name=name, data_dir=data_dir)
  return (f"Prepare it once as ArrayRecord with `{prepare}` (the same as `{build}`, a command "
          f"that needs apache-beam installed){manual}; then pass --config.data.path={data_dir}.")


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """ADM's ImageNet preprocessing: halve with a box filter while the short side is at
  least 2 * size, resize the short side to ``size`` (bicubic), crop the centre square.

  image: uint8 [H, W, C] -> uint8 [size, size, 3].
  """
  pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
  while min(pil.size) >= 2 * size:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
  scale = size / min(pil.size)
  pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
  array = np.asarray(pil.convert("RGB"))
  top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
  return array[top:top + size, left:left + size]


def _first_line(e: Exception) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def open_tfds(name: str, split: str, data_dir: str):
  """``tfds.data_source(name, split, data_dir)``, or a one-line DataError saying what is
  wrong: no dataset there, a dataset built as TFRECORD (which data_source cannot read), or
  no such split. Reads only metadata before that, and writes nothing.

  Returns:
    a random-access sequence of examples (dicts of numpy values).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = data_dir or "the TFDS default data_dir (~/tensorflow_datasets)"
  help_text = tfds_help(name, data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
    prepared = builder.is_prepared()
  except Exception as e:  # TFDS raises several types for a name or folder it cannot use
    raise DataError(f"TFDS dataset {name} cannot be opened in {where} ({_first_line(e)}). "
                    + help_text) from e
  if not prepared:
    raise DataError(f"TFDS dataset {name} is not prepared in {where} (no "
                    f"{builder.data_dir}/dataset_info.json). " + help_text)
  formats = {f.value for f in builder.info.available_file_formats()}
  if not formats:  # builds older than TFDS's file_format field were all TFRECORD
    formats = {f for f in ("tfrecord", "array_record")
               if any(builder.data_path.glob(f"*.{f}-*"))} or {"unknown"}
  if "array_record" not in formats:
    raise DataError(
        f"TFDS dataset {name} in {builder.data_dir} was built as "
        f"{'/'.join(sorted(formats)).upper()} files, but cfgdiff reads examples by index "
        "through tfds.data_source, which needs ArrayRecord. Rebuild it with `"
        + TFDS_PREPARE.format(name=name, data_dir=data_dir or "DIR") + "` (or `"
        + TFDS_BUILD.format(name=name, data_dir=data_dir or "DIR") + "`) after moving "
        f"{builder.data_dir} away, or convert it in place with `"
        + TFDS_CONVERT.format(path=builder.data_dir) + "` (both commands of the `tfds` tool "
        "need apache-beam installed).")
  splits = sorted(builder.info.splits)
  if split.split("[")[0] not in splits:
    raise DataError(f"TFDS dataset {name} in {builder.data_dir} has no split {split!r}; "
                    f"its splits are {splits}.")
  try:
    return builder.as_data_source(split=split, file_format="array_record")
  except Exception as e:  # a damaged or partly copied dataset folder
    raise DataError(f"TFDS dataset {name} (split {split}) in {builder.data_dir} cannot be "
                    f"read ({_first_line(e)}). " + help_text) from e


class TfdsSource:
  """A TFDS dataset read by index through `tfds.data_source` (ArrayRecord files; no
  TensorFlow in the input path). Images come out uint8 [image_size, image_size, 3]:
  stored at that size as they are (imagenet_resized), otherwise with ADM's centre crop.

  Picklable (TFDS's data sources are), so grain's worker processes can read it.
  """

  def __init__(self, name: str, split: str, data_dir: str, image_size: int):
    self._source = open_tfds(name, split, data_dir)
    self.image_size = image_size
    self._name, self._split, self._data_dir = name, split, data_dir

  def fingerprint(self) -> dict:
    """The example count and a SHA-256 of the split's metadata (version, shard files and
    their lengths and sizes): a rebuilt or different dataset changes it."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds.builder(self._name, data_dir=self._data_dir or None)
    info = builder.info.splits[self._split]
    metadata = {"name": self._name, "version": str(builder.version), "split": self._split,
                "shard_lengths": [int(n) for n in info.shard_lengths],
                "num_bytes": int(info.num_bytes),
                "files": sorted(str(f).rsplit("/", 1)[-1] for f in info.filenames)}
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    return {"examples": len(self), "sha256": digest.hexdigest()}

  def __len__(self) -> int:
    return len(self._source)

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, image_size, image_size, 3] and int32 [N] for ``indices`` [N]."""
    # One batched read: ArrayRecord fetches the records of different files in parallel.
    examples = self._source.__getitems__([int(i) for i in indices])
    images, labels = [], []
    for example in examples:
      image = np.asarray(example["image"])
      if image.shape[:2] != (self.image_size, self.image_size):
        image = center_crop_resize(image, self.image_size)
      images.append(image)
      labels.append(int(example["label"]))
    return np.stack(images), np.asarray(labels, np.int32)


# Mixed into each flip's seed so that flips and the shuffle never share a random stream.
_FLIP_STREAM = 0x666C6970  # "flip"


@dataclasses.dataclass
class Batcher:
  """Deterministic shuffled batches from an indexable source, a function of the step.

  Epoch e uses permutation ``default_rng([seed, e])`` of the examples; each epoch has
  ``len // global_batch_size`` steps (the remainder is dropped). ``batch(step)``
  returns this process's contiguous slice of the global batch, so the data position
  saved with a checkpoint is just the step. With ``random_flip``, the example at global
  position i of step s is mirrored left-right when draw i of
  ``default_rng([seed, _FLIP_STREAM, s])`` is below 1/2, whatever the process count.
  """

  source: ArraySource | TfdsSource
  global_batch_size: int
  seed: int
  process_index: int = 0
  process_count: int = 1
  random_flip: bool = False

  def __post_init__(self):
    self.steps_per_epoch = len(self.source) // self.global_batch_size
    if self.steps_per_epoch == 0:
      raise DataError(f"batch size {self.global_batch_size} exceeds the {len(self.source)} "
                      "training examples.")
    if self.global_batch_size % self.process_count:
      raise DataError(f"batch size {self.global_batch_size} does not split evenly over "
                      f"{self.process_count} processes.")
    self._epoch, self._order = -1, None

  def __getstate__(self) -> dict:
    # Sent to each worker process: the permutation cache is rebuilt there, not copied.
    return dict(self.__dict__, _epoch=-1, _order=None)

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._epoch:
      self._epoch = epoch
      self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
    return self._order

  def _local(self) -> slice:
    local = self.global_batch_size // self.process_count
    return slice(self.process_index * local, (self.process_index + 1) * local)

  def indices(self, step: int) -> np.ndarray:
    """Indices of this process's part of the global batch at ``step``.

    The global batch is sorted (sorted reads are faster) before it is split, so every
    example keeps its global position, and with it its noise, at any process count.
    """
    epoch, position = divmod(step, self.steps_per_epoch)
    start = position * self.global_batch_size
    global_indices = np.sort(self._permutation(epoch)[start:start + self.global_batch_size])
    return global_indices[self._local()]

  def flips(self, step: int) -> np.ndarray:
    """bool [B_local]: which of this process's examples at ``step`` are mirrored."""
    if not self.random_flip:
      return np.zeros(self.global_batch_size // self.process_count, bool)
    draws = np.random.default_rng([self.seed, _FLIP_STREAM, step]).random(
        self.global_batch_size)
    return draws[self._local()] < 0.5

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """{'image': float32 [B_local,H,W,C] in [-1, 1], 'label': int32 [B_local]}."""
    images, labels = self.source.read(self.indices(step))
    flip = self.flips(step)
    if flip.any():  # reads return fresh arrays (fancy indexing, np.stack): flip in place
      images[flip] = images[flip, :, ::-1]
    return {"image": to_model_range(images), "label": labels}


# Batches each worker process computes ahead of the training loop.
PREFETCH_PER_WORKER = 2
# Steps a pipeline covers from its start step: any run's length, never reached.
_HORIZON = 1 << 40


def _ignore_sigterm(worker_index: int, worker_count: int) -> None:
  """SLURM and Kubernetes send SIGTERM to every process of a job, input workers too: they
  must keep serving the batches the training process needs to reach its next step and
  save; they stop when the pipeline closes."""
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Pipeline:
  """This process's batches for steps start_step, start_step + 1, ..., on grain.

  ``next(it)`` is ``batcher.batch(step)`` for the next step; with ``num_workers`` > 0 the
  batches are computed ahead in that many worker processes (grain's mp_prefetch over a
  MapDataset of step numbers; worker k computes steps start + k, start + k + n, ... and
  grain interleaves them back in order). Batches depend on (seed, step) only, so the
  worker count, the prefetch depth and a resume never change them.

  The state, ``{"next_step": int}``, is JSON; ``set_state`` or a new pipeline started
  at that step continues exactly where this one stopped. Call ``close()`` (or use it as
  a context manager) to stop the workers.
  """

  def __init__(self, batcher: Batcher, start_step: int = 0, num_workers: int = 0,
               prefetch: int = PREFETCH_PER_WORKER):
    if num_workers < 0 or prefetch < 1:
      raise ValueError(f"num_workers={num_workers} must be >= 0 and prefetch={prefetch} >= 1.")
    self.batcher, self.num_workers, self.prefetch = batcher, num_workers, prefetch
    self._iterator = None
    self._start(start_step)

  def _start(self, step: int) -> None:
    self.close()
    self._next_step = int(step)
    if self.num_workers:
      import grain  # pylint: disable=g-import-not-at-top
      from absl import flags  # pylint: disable=g-import-not-at-top
      if not flags.FLAGS.is_parsed():
        # grain reads its absl flags when it starts workers; outside an absl program
        # (tests, notebooks, benchmarks) let it read their defaults instead of raising.
        flags.FLAGS.mark_as_parsed()
      steps = grain.MapDataset.range(self._next_step, self._next_step + _HORIZON)
      # One element per step; each worker computes its batches one after another.
      dataset = steps.map(self.batcher.batch).to_iter_dataset(
          grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.num_workers, per_worker_buffer_size=self.prefetch),
          worker_init_fn=_ignore_sigterm)
      self._iterator = iter(dataset)

  def __iter__(self) -> Pipeline:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    """{'image': float32 [B_local,H,W,C] in [-1, 1], 'label': int32 [B_local]}."""
    if self._iterator is None:
      batch = self.batcher.batch(self._next_step)
    else:
      # Copy out of grain's shared memory, so that no batch the caller keeps holds a
      # /dev/shm segment (a few ms per batch, against a step of 0.26 s or more).
      batch = {k: np.array(v) for k, v in next(self._iterator).items()}
    self._next_step += 1
    return batch

  def get_state(self) -> dict[str, int]:
    """{'next_step': the step of the batch the next ``next()`` returns}; JSON."""
    return {"next_step": self._next_step}

  def set_state(self, state: dict[str, int]) -> None:
    """Continues from a `get_state` dict (e.g. one restored with a checkpoint)."""
    self._start(int(state["next_step"]))

  def close(self) -> None:
    """Stops the worker processes, if any."""
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None

  def __enter__(self) -> Pipeline:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def make_pipeline(source: ArraySource | TfdsSource, global_batch_size: int, seed: int,
                  start_step: int = 0, process_index: int = 0, process_count: int = 1,
                  num_workers: int = 0, random_flip: bool = False,
                  prefetch: int = PREFETCH_PER_WORKER) -> Pipeline:
  """This process's training batches from ``start_step`` on (see `Pipeline`, `Batcher`).

  To resume from a saved ``it.get_state()``, pass ``start_step=state['next_step']``.

  Args:
    source: the training examples.
    global_batch_size: examples per step over all processes (divisible by process_count).
    seed: the data seed (shuffle order and flips).
    start_step: the step of the first batch.
    process_index, process_count: this process and how many share each global batch.
    num_workers: worker processes computing batches ahead; 0 computes each batch in the
      calling thread when asked (no processes, no prefetch).
    random_flip: mirror each example left-right with probability 1/2.
    prefetch: batches each worker computes ahead.
  """
  batcher = Batcher(source, global_batch_size, seed, process_index, process_count, random_flip)
  return Pipeline(batcher, start_step, num_workers, prefetch)
