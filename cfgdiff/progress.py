"""Progress of long work in the log: count, rate and ETA."""

from __future__ import annotations

import time

from absl import logging


class Progress:
  """Logs ``what: done/total images, rate, ETA`` as work advances, at most every
  ``every`` seconds (0: at every call) and always at the end."""

  def __init__(self, what: str, total: int, every: float = 0.0):
    self.what, self.total, self.every = what, total, every
    self.done, self.start, self.last = 0, time.time(), -float("inf")

  def advance(self, n: int) -> None:
    """Records ``n`` more images done."""
    self.done += n
    now = time.time()
    if self.done < self.total and now - self.last < self.every:
      return
    self.last, rate = now, self.done / max(now - self.start, 1e-9)
    logging.info("%s: %d/%d images, %.1f images/s, ETA %.0f s", self.what, self.done,
                 self.total, rate, (self.total - self.done) / max(rate, 1e-9))
