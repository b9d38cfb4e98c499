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
