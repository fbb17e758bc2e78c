"""Input pipelines. Batches are a pure function of (seed, step), so the data position
is just the step: resuming at step s yields exactly the batches an uninterrupted run sees.

Each process reads only its own slice of every global batch (multi-host), from any
`Source` (cfgdiff/sources.py opens the one config.data names). `make_pipeline` computes
the batches ahead in grain worker processes; `Batcher.batch(step)` is the function they
all compute.
"""

from __future__ import annotations

import dataclasses
import signal
from typing import Protocol

import numpy as np
from PIL import Image


class DataError(RuntimeError):
  """Missing or malformed input data; the message says how to fix it."""


class Source(Protocol):
  """Examples by index (cfgdiff/sources.py): picklable, so grain's workers can read it."""

  def __len__(self) -> int: ...

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, H, W, C] images and int32 [N] labels of ``indices`` [N]."""

  def fingerprint(self) -> dict:
    """{"examples": int, "sha256": str}: changes when the data does (resume checks it)."""


def to_model_range(images_uint8: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images_uint8.astype(np.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255] (clipped, rounded)."""
  return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def center_crop_resize(image: np.ndarray, size: int, channels: int = 3) -> np.ndarray:
  """ADM's ImageNet preprocessing: halve with a box filter while the short side is at
  least 2 * size, resize the short side to ``size`` (bicubic), crop the centre square.

  image: uint8 [H, W, C] -> uint8 [size, size, channels] (channels 3: RGB, 1: grey).
  """
  pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
  while min(pil.size) >= 2 * size:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
  scale = size / min(pil.size)
  pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
  array = np.asarray(pil.convert("RGB" if channels == 3 else "L"))
  if array.ndim == 2:
    array = array[..., None]
  top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
  return array[top:top + size, left:left + size]


# Mixed into each flip's or crop's seed so that they and the shuffle never share a
# random stream.
_FLIP_STREAM = 0x666C6970  # "flip"
_CROP_STREAM = 0x63726F70  # "crop"


def enlarge_and_crop(image: np.ndarray, enlarged: int, top: int, left: int) -> np.ndarray:
  """ADM's random crop of an image already at its size S (guided-diffusion's
  random_crop_arr with crop fractions [0.8, 1]): bicubic resize to ``enlarged`` >= S, then
  the S x S window at (top, left). uint8 [S, S, C] -> uint8 [S, S, C]."""
  size = image.shape[0]
  pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
  array = np.asarray(pil.resize((enlarged, enlarged), resample=Image.BICUBIC))
  return array.reshape(enlarged, enlarged, -1)[top:top + size, left:left + size]


@dataclasses.dataclass
class Batcher:
  """Deterministic shuffled batches from an indexable source, a function of the step.

  Epoch e uses permutation ``default_rng([seed, e])`` of the examples; each epoch has
  ``len // global_batch_size`` steps (the remainder is dropped). ``batch(step)``
  returns this process's contiguous slice of the global batch, so the data position
  saved with a checkpoint is just the step. With ``random_flip``, the example at global
  position i of step s is mirrored left-right when draw i of
  ``default_rng([seed, _FLIP_STREAM, s])`` is below 1/2, whatever the process count; with
  ``random_crop``, its enlarged size and window come from ``default_rng([seed,
  _CROP_STREAM, s])`` the same way (`enlarge_and_crop`, before the flip).
  """

  source: Source
  global_batch_size: int
  seed: int
  process_index: int = 0
  process_count: int = 1
  random_flip: bool = False
  random_crop: bool = False

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

  def crops(self, step: int, size: int) -> np.ndarray:
    """int [B_local, 3]: (enlarged size, top, left) of each of this process's examples at
    ``step``, for images of side ``size``: the size uniform in [S, ceil(1.25 S)], then the
    window uniform over the enlarged image (ADM's draws)."""
    rng = np.random.default_rng([self.seed, _CROP_STREAM, step])
    enlarged = rng.integers(size, -(-5 * size // 4) + 1, self.global_batch_size)
    top, left = (np.floor(rng.random(self.global_batch_size) * (enlarged - size + 1))
                 .astype(int) for _ in range(2))
    return np.stack([enlarged, top, left], axis=1)[self._local()]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """{'image': float32 [B_local,H,W,C] in [-1, 1], 'label': int32 [B_local]}."""
    images, labels = self.source.read(self.indices(step))
    if self.random_crop:
      for i, (enlarged, top, left) in enumerate(self.crops(step, images.shape[1])):
        images[i] = enlarge_and_crop(images[i], enlarged, top, left)
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


def make_pipeline(source: Source, global_batch_size: int, seed: int,
                  start_step: int = 0, process_index: int = 0, process_count: int = 1,
                  num_workers: int = 0, random_flip: bool = False, random_crop: bool = False,
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
    random_crop: ADM's random enlarge-and-crop of each example (`Batcher`).
    prefetch: batches each worker computes ahead.
  """
  batcher = Batcher(source, global_batch_size, seed, process_index, process_count, random_flip,
                    random_crop)
  return Pipeline(batcher, start_step, num_workers, prefetch)
