"""TFDS datasets as lazy random-access sources, without TensorFlow.

`tfds.data_source` reads array_record files record by record and decodes
them with NumPy / PIL, so no TensorFlow is needed at run time (`tfds.load`
would need it). Nothing is ever downloaded: a dataset must already be
prepared in array_record format under the TFDS data dir, and a missing one
is an error that says how to prepare it.
"""

import functools
import os
from typing import Any

import numpy as np

from tta_jax.data import sources
from tta_jax.data.images import image_folder


def _not_prepared(
  name: str, split: str, data_dir: str | None, error: Exception
) -> FileNotFoundError:
  import tensorflow_datasets as tfds

  where = (
    data_dir
    or os.environ.get('TFDS_DATA_DIR')
    or '~/tensorflow_datasets (the TFDS default)'
  )
  try:
    prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
  except Exception:  # noqa: BLE001 (only picks the hint below)
    prepared = False
  if prepared:
    hint = (
      'it is prepared there, but not readable at random access (TFDS '
      'prepares tfrecord by default). Convert it once with `tfds '
      'convert_format --dataset_version_dir=<its version folder> '
      '--out_file_format=array_record`'
    )
  else:
    hint = (
      f'tta_jax never downloads. Prepare it once, on a machine with '
      f'TensorFlow: `tfds build {name} --file_format=array_record '
      f'--data_dir=<DIR>` (manual-download datasets such as ImageNet need '
      f'their archives in <DIR>/downloads/manual), then pass data_dir=<DIR> '
      f'or set TFDS_DATA_DIR'
    )
  # TFDS's own message for a dataset that is not there at all talks of a
  # tfrecord copy, which would mislead; it is kept only when one exists.
  detail = f' ({type(error).__name__}: {error})' if prepared else ''
  return FileNotFoundError(
    f'TFDS dataset {name!r} (split {split!r}) is not available under '
    f'{where}: {hint}.{detail}'
  )


def open_data_source(name: str, split: str, data_dir: str | None = None):
  """`tfds.data_source(name, split=split)`, never downloading."""
  import tensorflow_datasets as tfds

  try:
    return tfds.data_source(  # '' (a config's unset dir): TFDS's default
      name, split=split, data_dir=data_dir or None, download=False
    )
  except (
    NotImplementedError,
    FileNotFoundError,
    AssertionError,
    KeyError,  # imagenet2012 when its manual download is missing
    ValueError,
  ) as e:
    raise _not_prepared(name, split, data_dir, e) from e


def class_names(data_source: Any) -> list[str] | None:
  """The label names of a `tfds.data_source` (None if it has none)."""
  info = getattr(data_source, 'dataset_info', None)
  label = info.features['label'] if info is not None else None
  return list(label.names) if label is not None else None


def imagenet_wnids() -> list[str]:
  """The 1000 ImageNet-1k wnids in label order, from the TFDS package.

  `tensorflow_datasets/datasets/imagenet2012/labels.txt` lists the synsets
  sorted, the label order of TFDS imagenet2012 and of torchvision /
  timm ImageNet models alike.
  """
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

  with open(imagenet_common.label_names_file()) as f:
    wnids = f.read().split()
  if len(wnids) != 1000:
    raise ValueError(f'expected 1000 ImageNet wnids, read {len(wnids)}')
  return wnids


class TfdsSource:
  """A lazy source over a `tfds.data_source` (or any sequence of examples).

  Args:
    data_source: random access to `{'image': uint8 [H, W, C], 'label': int}`
      examples (`tfds.data_source(...)`).
    num_classes: labels must lie in [0, num_classes).
    preprocess: the resize applied to every decoded image.
    num_threads: examples are read and decoded in this many threads (the
      array_record reader is thread-safe).
    name: for error messages.
  """

  def __init__(
    self,
    data_source: Any,
    *,
    num_classes: int,
    preprocess: image_folder.Preprocess = image_folder.NO_RESIZE,
    num_threads: int = image_folder.DEFAULT_NUM_THREADS,
    name: str = '',
  ):
    self.data_source = data_source
    self.num_classes = num_classes
    self.preprocess = preprocess.check()
    self.num_threads = num_threads
    self.name = name
    if len(data_source) == 0:
      raise ValueError(f'TFDS source {name!r} is empty')

  def __len__(self) -> int:
    return len(self.data_source)

  def _read(self, i: int) -> tuple[np.ndarray, int]:
    example = self.data_source[int(i)]
    return self.preprocess(example['image']), int(example['label'])

  def __getitem__(self, indices: np.ndarray) -> sources.Batch:
    who = f'TfdsSource({self.name!r})'
    idx = image_folder.as_indices(indices, len(self), who)
    pairs = image_folder.parallel_map(self._read, idx, self.num_threads)
    images, labels = zip(*pairs, strict=True)
    return image_folder.finish_batch(images, labels, self.num_classes, who)

  def read_labels(self, indices: np.ndarray) -> np.ndarray:
    """int32 labels of `indices`; each record is read and decoded whole
    (TF-free TFDS cannot skip the image), so this costs a pass over them."""
    idx = image_folder.as_indices(
      indices, len(self), f'TfdsSource({self.name!r})'
    )
    return np.asarray(
      image_folder.parallel_map(
        lambda i: int(self.data_source[int(i)]['label']), idx, self.num_threads
      ),
      np.int32,
    )

  @functools.cached_property
  def labels(self) -> np.ndarray:
    """int32 [n]: every label, read once on first access (a pass over the
    whole set; only label-correlated streams need it)."""
    return self.read_labels(np.arange(len(self)))
