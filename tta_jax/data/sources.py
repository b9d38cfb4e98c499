"""Random-access data sources and the domains a benchmark streams over.

A source is anything with `len(source)` and `source[indices]` returning a
batch dict `{'image': float32 [n, H, W, C] in [0, 1], 'label': int32 [n]}`
for an integer index array. Streams (`tta_jax.data.streams`) only plan
indices, so the same stream code serves in-memory arrays (the embedded
digits), array_record files read through `tfds.data_source`, and image
folders, and a corruption can be applied lazily, keyed by example index, so
that an example's corrupted pixels never depend on how it was batched.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import numpy as np

Batch = dict[str, np.ndarray]


class Source(Protocol):
  def __len__(self) -> int: ...

  def __getitem__(self, indices: np.ndarray) -> Batch: ...


class ArraySource:
  """A source over in-memory arrays."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if len(images) != len(labels):
      raise ValueError(
        f'{len(images)} images but {len(labels)} labels in ArraySource'
      )
    self.images = images
    self.labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, indices: np.ndarray) -> Batch:
    indices = np.asarray(indices)
    return {
      'image': np.asarray(self.images[indices], np.float32),
      'label': self.labels[indices],
    }


class MappedSource:
  """A source whose batches pass through `fn(batch, indices) -> batch`.

  `fn` receives the global example indices, so per-example randomness can be
  keyed by index (deterministic whatever the batching).
  """

  def __init__(self, source: Source, fn: Callable[[Batch, np.ndarray], Batch]):
    self.source, self.fn = source, fn

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, indices: np.ndarray) -> Batch:
    indices = np.asarray(indices)
    return self.fn(self.source[indices], indices)

  @property
  def labels(self) -> np.ndarray | None:
    """The wrapped source's labels (a shift never changes them)."""
    return getattr(self.source, 'labels', None)


class Domain(NamedTuple):
  """A named test domain: a source plus metadata (corruption, severity...)."""

  name: str
  source: Source
  info: Mapping[str, Any] = {}

  def __len__(self) -> int:
    return len(self.source)


class ConcatSource:
  """Several sources (same image shape) as one, in order."""

  def __init__(self, parts: list[Source]):
    if not parts:
      raise ValueError('ConcatSource needs at least one source')
    self.parts = list(parts)
    self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, indices: np.ndarray) -> Batch:
    indices = np.asarray(indices)
    if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
      raise IndexError(f'index out of range for {len(self)} examples')
    which = np.searchsorted(self.offsets, indices, side='right') - 1
    out = None
    for w in np.unique(which):
      rows = np.flatnonzero(which == w)
      part = self.parts[w][indices[rows] - self.offsets[w]]
      if out is None:
        out = {
          k: np.empty((len(indices), *v.shape[1:]), v.dtype)
          for k, v in part.items()
        }
      for k, v in part.items():
        out[k][rows] = v
    return out

  @property
  def labels(self) -> np.ndarray | None:
    labels = [getattr(p, 'labels', None) for p in self.parts]
    if any(lab is None for lab in labels):
      return None
    return np.concatenate(labels)


class SubsetSource:
  """The examples `indices` of a source, re-indexed from 0."""

  def __init__(self, source: Source, indices: np.ndarray):
    self.source, self.indices = source, np.asarray(indices)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, indices: np.ndarray) -> Batch:
    return self.source[self.indices[np.asarray(indices)]]

  @property
  def labels(self) -> np.ndarray | None:
    labels = getattr(self.source, 'labels', None)
    return None if labels is None else np.asarray(labels)[self.indices]


def in_memory(domain: Domain, batch_size: int = 1024) -> Domain:
  """The domain with its (small) source read once into an `ArraySource`."""
  data = materialize(domain.source, batch_size)
  return Domain(
    domain.name, ArraySource(data['image'], data['label']), domain.info
  )


def materialize(source: Source, batch_size: int = 1024) -> Batch:
  """Reads a whole (small) source into memory."""
  n = len(source)
  if n == 0:
    raise ValueError('cannot materialize an empty source')
  parts = [
    source[np.arange(i, min(i + batch_size, n))]
    for i in range(0, n, batch_size)
  ]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def padded_batches(data, batch_size: int, limit: int = 0):
  """Fixed-shape batches of a split, with a validity mask.

  `data` is an in-memory split (a mapping with `image` and `label` arrays)
  or a `Source` (read batch by batch). The last batch is padded by
  repeating its first row (`mask` False there), so a jitted consumer
  compiles one shape. `limit` > 0 keeps the first `limit` examples.
  """
  in_memory = isinstance(data, Mapping)
  n = len(data['label']) if in_memory else len(data)
  if limit:
    n = min(n, limit)
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    valid = idx < n
    idx = np.where(valid, idx, start)
    if in_memory:
      yield {
        'image': data['image'][idx],
        'label': data['label'][idx],
        'mask': valid,
      }
    else:
      batch = data[idx]
      yield {'image': batch['image'], 'label': batch['label'], 'mask': valid}
