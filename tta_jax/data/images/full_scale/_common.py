"""What the full-scale loaders share: the corruption and severity names,
`SubsetSource` and `subset_indices`, and the argument checks and domain
builders of the corruption loaders."""

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tta_jax.data import sources
from tta_jax.data.images import (
  corruptions as corruptions_lib,
  image_folder,
  tfds_sources,
)

# The 15 benchmark corruptions of Hendrycks & Dietterich (2019), in the
# order of their paper, Tent and CoTTA (RobustBench lists another order).
CORRUPTIONS = corruptions_lib.CORRUPTIONS
# The held-out four, released beside them.
EXTRA_CORRUPTIONS = corruptions_lib.VALIDATION_CORRUPTIONS
SEVERITIES = (1, 2, 3, 4, 5)
_NUM_THREADS = image_folder.DEFAULT_NUM_THREADS


class SubsetSource:
  """The examples `indices` of `source`, in that order."""

  def __init__(self, source: sources.Source, indices: np.ndarray):
    self.source = source
    self.indices = np.asarray(indices, np.int64)
    if not len(self.indices):
      raise ValueError('empty subset')

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, indices: np.ndarray) -> sources.Batch:
    idx = image_folder.as_indices(indices, len(self), 'SubsetSource')
    return self.source[self.indices[idx]]

  @property
  def labels(self) -> np.ndarray:
    read = getattr(self.source, 'read_labels', None)
    if read is not None:
      return read(self.indices)
    return np.asarray(self.source.labels)[self.indices]


def subset_indices(n: int, num_examples: int | None, seed: int) -> np.ndarray:
  """All of range(n), or the first `num_examples` of a seeded permutation
  (`np.random.default_rng(seed)`), sorted."""
  if num_examples is None or num_examples >= n:
    return np.arange(n)
  if num_examples < 1:
    raise ValueError(f'num_examples must be positive, got {num_examples}')
  return np.sort(np.random.default_rng(seed).permutation(n)[:num_examples])


def _severities(severity: int, severities: Sequence[int] | None) -> list[int]:
  out = [severity] if severities is None else [int(s) for s in severities]
  bad = [s for s in out if s not in SEVERITIES]
  if bad or not out:
    raise ValueError(f'severities must lie in {SEVERITIES}, got {out}')
  return out


def _corruptions(
  corruptions: Sequence[str] | None,
  valid: Sequence[str],
  default: Sequence[str] = CORRUPTIONS,
) -> list[str]:
  if isinstance(corruptions, str):
    corruptions = [corruptions]
  names = list(default if corruptions is None else corruptions)
  unknown = [c for c in names if c not in valid]
  if unknown or not names:
    raise ValueError(f'unknown corruptions {unknown}; valid: {list(valid)}')
  return names


def _corruption_domains(
  make: Callable[[str, int], tuple[sources.Source, dict[str, Any]]],
  corruptions: Sequence[str],
  severities: Sequence[int],
) -> list[sources.Domain]:
  """Domains corruption-major; a repeated severity reuses its source."""
  built, out = {}, []
  for c in corruptions:
    for s in severities:
      if (c, s) not in built:
        built[c, s] = make(c, s)
      source, info = built[c, s]
      name = c if len(set(severities)) == 1 else f'{c}@{s}'
      out.append(
        sources.Domain(name, source, {**info, 'corruption': c, 'severity': s})
      )
  return out


def _tfds_source(
  name: str,
  split: str,
  data_dir: str | None,
  *,
  preprocess: image_folder.Preprocess,
  num_threads: int,
) -> tfds_sources.TfdsSource:
  ds = tfds_sources.open_data_source(name, split, data_dir)
  names = tfds_sources.class_names(ds)
  return tfds_sources.TfdsSource(
    ds,
    num_classes=len(names),
    preprocess=preprocess,
    num_threads=num_threads,
    name=f'{name}:{split}',
  )


def _require_dir(path: str | None, dataset: str, layout: str) -> str:
  if path is None:
    raise ValueError(f'{dataset}: pass data_dir=<folder>; expected {layout}')
  if not os.path.isdir(path):
    raise FileNotFoundError(
      f'{dataset}: {path!r} is not a directory; expected {layout}'
    )
  return path
