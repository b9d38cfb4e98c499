"""CIFAR: CIFAR-10-C and CIFAR-100-C (TFDS, Hendrycks' released `.npy`
folders, or generated on access), and the clean CIFAR-10 / CIFAR-100 test
sets."""

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from tta_jax.data import sources
from tta_jax.data.images import corruptions as corruptions_lib, image_folder
from tta_jax.data.images.full_scale._common import (
  _NUM_THREADS,
  CORRUPTIONS,
  EXTRA_CORRUPTIONS,
  _corruption_domains,
  _corruptions,
  _require_dir,
  _severities,
  _tfds_source,
)

# TFDS's cifar10_corrupted renames two of the corruptions.
_TFDS_CIFAR10_C = {
  'glass_blur': 'frosted_glass_blur',
  'elastic_transform': 'elastic',
}


class HendrycksNpySource:
  """One severity of a released CIFAR-10-C / CIFAR-100-C corruption.

  `images_path` holds uint8 [5 n, 32, 32, 3], severities 1..5 stacked n
  each; `labels_path` the matching labels (the test labels repeated 5
  times). The images are memory-mapped: a batch reads only its rows.
  """

  def __init__(
    self,
    images_path: str,
    labels_path: str,
    severity: int,
    *,
    num_classes: int,
    name: str = '',
  ):
    images = np.load(images_path, mmap_mode='r')
    labels = np.load(labels_path)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(
        f'{images_path}: expected uint8 [N, H, W, 3], got {images.dtype} '
        f'{images.shape}'
      )
    if labels.ndim != 1 or len(labels) != len(images) or len(images) % 5:
      raise ValueError(
        f'{images_path}: {len(images)} images and {labels.shape} labels; '
        'expected equally many, 5 severities stacked'
      )
    if len(images) == 0:
      raise ValueError(f'{images_path} is empty')
    n = len(images) // 5
    rows = slice((severity - 1) * n, severity * n)
    self.images = images[rows]  # still a lazy memmap view
    self.labels = np.asarray(labels[rows], np.int32)  # [n]
    self.num_classes = num_classes
    self.name = name
    if self.labels.min() < 0 or self.labels.max() >= num_classes:
      raise ValueError(f'{labels_path}: labels outside [0, {num_classes})')

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, indices: np.ndarray) -> sources.Batch:
    who = f'HendrycksNpySource({self.name!r})'
    idx = image_folder.as_indices(indices, len(self), who)
    return image_folder.finish_batch(
      np.asarray(self.images[idx]),
      self.labels[idx],
      self.num_classes,
      who,
    )


class _Checked:
  """Validates the batches of a mapped source; labels pass through from the
  clean source (a corruption keeps them)."""

  def __init__(self, source: sources.Source, clean: Any, name: str):
    self.source, self.clean, self.name = source, clean, name

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, indices: np.ndarray) -> sources.Batch:
    batch = self.source[indices]
    return image_folder.validate_batch(
      {
        'image': np.asarray(batch['image'], np.float32),
        'label': np.asarray(batch['label'], np.int32),
      },
      self.name,
    )

  @property
  def labels(self) -> np.ndarray:
    return self.clean.labels


def cifar10_corrupted(
  *,
  severity: int = 5,
  severities: Sequence[int] | None = None,
  corruptions: Sequence[str] | None = None,
  data_dir: str | None = None,
  split: str = 'test',
  num_threads: int = _NUM_THREADS,
) -> list[sources.Domain]:
  """CIFAR-10-C as TFDS builds it (`cifar10_corrupted/<c>_<s>`), 32x32x3.

  The TFDS build wraps Hendrycks' released arrays, so the pixels equal
  `cifar10_c`'s. Domains use the standard names (TFDS calls glass_blur
  'frosted_glass_blur' and elastic_transform 'elastic').

  Args:
    severity: the severity when `severities` is None.
    severities: several severities (one domain per corruption and severity).
    corruptions: default the 15 `CORRUPTIONS`; `EXTRA_CORRUPTIONS` too.
    data_dir: the TFDS data dir (None: `$TFDS_DATA_DIR` or the default).
    split: the TFDS split.
    num_threads: read / decode threads per batch.

  Returns:
    Domains, info: dataset, corruption, severity, num_classes (10).
  """
  names = _corruptions(corruptions, CORRUPTIONS + EXTRA_CORRUPTIONS)
  preprocess = image_folder.Preprocess()

  def make(c, s):
    tfds_name = f'cifar10_corrupted/{_TFDS_CIFAR10_C.get(c, c)}_{s}'
    src = _tfds_source(
      tfds_name, split, data_dir, preprocess=preprocess, num_threads=num_threads
    )
    return src, {
      'dataset': 'cifar10_corrupted',
      'num_classes': 10,
      'preprocess': preprocess.describe(),
      'tfds_name': tfds_name,
    }

  return _corruption_domains(make, names, _severities(severity, severities))


def hendrycks_c(
  data_dir: str | None,
  *,
  num_classes: int,
  dataset: str,
  release: str = 'CIFAR-10-C/ of zenodo.org/record/2535967',
  severity: int = 5,
  severities: Sequence[int] | None = None,
  corruptions: Sequence[str] | None = None,
) -> list[sources.Domain]:
  """CIFAR-10-C / CIFAR-100-C as released (Zenodo tar), memory-mapped.

  `data_dir` is the extracted `CIFAR-10-C/` (or `CIFAR-100-C/`) folder:
  `<corruption>.npy` (uint8 [50000, 32, 32, 3], severities 1..5 stacked
  10,000 each) and `labels.npy`. Severity s is rows `[(s - 1) n, s n)`, as
  RobustBench's `load_corruptions_cifar` slices them.
  """
  layout = (
    f'the extracted release folder ({release}) holding '
    '<corruption>.npy and labels.npy'
  )
  data_dir = _require_dir(data_dir, dataset, layout)
  names = _corruptions(corruptions, CORRUPTIONS + EXTRA_CORRUPTIONS)
  labels_path = os.path.join(data_dir, 'labels.npy')
  needed = ['labels.npy'] + [f'{c}.npy' for c in names]
  missing = [f for f in needed if not os.path.isfile(os.path.join(data_dir, f))]
  if missing:
    raise FileNotFoundError(
      f'{dataset}: {missing} missing in {data_dir!r}; expected {layout}'
    )

  def make(c, s):
    src = HendrycksNpySource(
      os.path.join(data_dir, f'{c}.npy'),
      labels_path,
      s,
      num_classes=num_classes,
      name=f'{dataset}/{c}_{s}',
    )
    return src, {
      'dataset': dataset,
      'num_classes': num_classes,
      'preprocess': 'none',
    }

  return _corruption_domains(make, names, _severities(severity, severities))


def cifar10_c(
  *,
  data_dir: str | None = None,
  severity: int = 5,
  severities: Sequence[int] | None = None,
  corruptions: Sequence[str] | None = None,
) -> list[sources.Domain]:
  """CIFAR-10-C from the released `.npy` folder (see `hendrycks_c`)."""
  return hendrycks_c(
    data_dir,
    num_classes=10,
    dataset='cifar10_c',
    severity=severity,
    severities=severities,
    corruptions=corruptions,
  )


def cifar100_c(
  *,
  data_dir: str | None = None,
  severity: int = 5,
  severities: Sequence[int] | None = None,
  corruptions: Sequence[str] | None = None,
) -> list[sources.Domain]:
  """CIFAR-100-C from the released `.npy` folder (see `hendrycks_c`).

  CIFAR-100-C is not in the TFDS catalogue; its release
  (zenodo.org/record/3555552) has the CIFAR-10-C layout.
  """
  return hendrycks_c(
    data_dir,
    num_classes=100,
    dataset='cifar100_c',
    release='CIFAR-100-C/ of zenodo.org/record/3555552',
    severity=severity,
    severities=severities,
    corruptions=corruptions,
  )


def cifar100_corrupted(
  *,
  severity: int = 5,
  severities: Sequence[int] | None = None,
  corruptions: Sequence[str] | None = None,
  data_dir: str | None = None,
  seed: int = 0,
  split: str = 'test',
  num_threads: int = _NUM_THREADS,
) -> list[sources.Domain]:
  """TFDS `cifar100` with corruptions generated on access.

  The corruptions are `tta_jax.data.images.corruptions`' JAX ports (keyed
  by example index and `seed`, like TTAB's "stochastic" CIFAR-C), not the
  released CIFAR-100-C pixels: use `cifar100_c` for those. Default: all of
  that package's `CORRUPTIONS`.
  """

  names = _corruptions(
    corruptions, corruptions_lib.CORRUPTIONS, corruptions_lib.CORRUPTIONS
  )
  sevs = _severities(severity, severities)
  preprocess = image_folder.Preprocess()
  clean = _tfds_source(
    'cifar100', split, data_dir, preprocess=preprocess, num_threads=num_threads
  )

  def make(c, s):
    mapped = corruptions_lib.corrupted_source(clean, c, s, seed)
    return _Checked(mapped, clean, f'cifar100_corrupted/{c}_{s}'), {
      'dataset': 'cifar100_corrupted',
      'num_classes': 100,
      'preprocess': 'none',
      'generated': True,
      'seed': seed,
    }

  return _corruption_domains(make, names, sevs)


def _tfds_clean(
  tfds_name: str, *, data_dir: str | None, split: str, num_threads: int
) -> list[sources.Domain]:
  preprocess = image_folder.Preprocess()
  src = _tfds_source(
    tfds_name, split, data_dir, preprocess=preprocess, num_threads=num_threads
  )
  return [
    sources.Domain(
      'clean',
      src,
      {
        'dataset': tfds_name,
        'num_classes': src.num_classes,
        'split': split,
        'preprocess': preprocess.describe(),
      },
    )
  ]


def cifar10(
  *,
  data_dir: str | None = None,
  split: str = 'test',
  num_threads: int = _NUM_THREADS,
) -> list[sources.Domain]:
  """Clean TFDS CIFAR-10 (one domain, 'clean')."""
  return _tfds_clean(
    'cifar10', data_dir=data_dir, split=split, num_threads=num_threads
  )


def cifar100(
  *,
  data_dir: str | None = None,
  split: str = 'test',
  num_threads: int = _NUM_THREADS,
) -> list[sources.Domain]:
  """Clean TFDS CIFAR-100, fine labels (one domain, 'clean')."""
  return _tfds_clean(
    'cifar100', data_dir=data_dir, split=split, num_threads=num_threads
  )
