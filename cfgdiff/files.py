"""Workdir file I/O that works the same on a local disk and on a bucket (gs://...).

TPU pods and clusters keep the workdir in cloud storage; `etils.epath` (what Orbax
uses) reads and writes both. Writes go to a temporary name and are renamed into place,
so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import uuid

from etils import epath


def path(location: str | epath.Path) -> epath.Path:
  """An absolute epath for a local path, the URL itself for gs:// and friends."""
  p = epath.Path(location)
  return p if "://" in str(location) else p.absolute()


def write_atomic(location: str | epath.Path, payload: bytes | str) -> None:
  """Writes ``payload`` to a temporary sibling, then renames it over ``location``."""
  target = path(location)
  target.parent.mkdir(parents=True, exist_ok=True)
  # A name of its own per write: two writers of one file (two jobs racing for a lock)
  # must never rename each other's half-written temporary.
  tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
  if isinstance(payload, str):
    tmp.write_text(payload)
  else:
    tmp.write_bytes(payload)
  tmp.replace(target)


def sha256_file(location: str) -> str:
  """The SHA-256 hex digest of a local file, read in 16 MiB chunks (weights and dataset
  archives run to gigabytes)."""
  digest = hashlib.sha256()
  with open(location, "rb") as f:
    while chunk := f.read(1 << 24):
      digest.update(chunk)
  return digest.hexdigest()
