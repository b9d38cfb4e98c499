"""ImageNet-1k itself (ILSVRC-2012: validation, train) and ImageNet-V2, with
ImageNet-1k labels: the in-distribution test set of the vision-language
benchmarks, the source of CoOp's 16 shots per class, and ImageNet-V2's
matched-frequency reproduction of the validation set."""

import os

from tta_jax.data import sources
from tta_jax.data.images import image_folder
from tta_jax.data.images.full_scale._common import (
  _NUM_THREADS,
  SubsetSource,
  _require_dir,
  subset_indices,
)
from tta_jax.data.images.full_scale.imagenet import _imagenet_variant


def _head(
  domains: list[sources.Domain], num_examples: int | None, seed: int
) -> list[sources.Domain]:
  """`num_examples` seeded examples of the (one) domain; None: all."""
  if num_examples is None:
    return domains
  (d,) = domains
  idx = subset_indices(len(d.source), num_examples, seed)
  info = dict(d.info, num_examples=len(idx))
  return [sources.Domain(d.name, SubsetSource(d.source, idx), info)]


def imagenet(
  *,
  data_dir: str | None = None,
  folder: str | None = None,
  split: str = 'validation',
  num_examples: int | None = None,
  seed: int = 0,
  image_size: int = 224,
  resize_size: int | None = 256,
  num_threads: int = _NUM_THREADS,
) -> list[sources.Domain]:
  """ImageNet-1k (ILSVRC-2012), one domain `imagenet`.

  From TFDS `imagenet2012` (`data_dir`; `split` is any TFDS split string:
  'validation', 'train', or a slice such as 'train[:10000]'), or from a
  folder of one split (`folder=`): `<folder>/<wnid>/<images>` (the
  training set as released; the validation set after the usual sorting
  of its images into wnid folders). Labels index the sorted wnids.

  Args:
    num_examples: a seeded subset of this many (`subset_indices`); None:
      all.
    seed: the subset's seed.
  """
  domains = _imagenet_variant(
    'imagenet',
    'imagenet2012',
    None,
    data_dir=data_dir,
    folder=folder,
    split=split,
    image_size=image_size,
    resize_size=resize_size,
    num_threads=num_threads,
  )
  return _head(domains, num_examples, seed)


def imagenet_v2(
  *,
  data_dir: str | None = None,
  folder: str | None = None,
  variant: str = 'matched-frequency',
  image_size: int = 224,
  resize_size: int | None = 256,
  num_threads: int = _NUM_THREADS,
) -> list[sources.Domain]:
  """ImageNet-V2 (10,000 images, all 1000 classes), one domain `imagenet_v2`.

  From TFDS `imagenet_v2/<variant>` (its only split, 'test'), or from the
  released folder (`folder=`, e.g. `imagenetv2-matched-frequency-format-
  val/`), whose class folders are the label indices `0` .. `999`.
  """
  if folder is None:
    return _imagenet_variant(
      'imagenet_v2',
      f'imagenet_v2/{variant}',
      None,
      data_dir=data_dir,
      folder=None,
      split='test',
      image_size=image_size,
      resize_size=resize_size,
      num_threads=num_threads,
    )
  layout = 'the released ImageNet-V2 folder: <folder>/<0..999>/<images>'
  folder = _require_dir(folder, 'imagenet_v2', layout)
  present = image_folder.subdirectories(folder)
  bad = [c for c in present if not c.isdigit() or not 0 <= int(c) < 1000]
  if bad or not present:
    raise ValueError(
      f'imagenet_v2: class folders must be label indices 0..999; found '
      f'{bad[:5] or "none"} in {folder!r}; expected {layout}'
    )
  files, labels = [], []
  for c in present:
    found = image_folder.list_images(os.path.join(folder, c))
    files += found
    labels += [int(c)] * len(found)
  if not files:
    raise FileNotFoundError(f'imagenet_v2: no images under {folder!r}')
  preprocess = image_folder.Preprocess(image_size, resize_size).check()
  source = image_folder.ImageFolderSource(
    files,
    labels,
    num_classes=1000,
    preprocess=preprocess,
    num_threads=num_threads,
    name='imagenet_v2',
  )
  info = {
    'dataset': 'imagenet_v2',
    'num_classes': 1000,
    'preprocess': preprocess.describe(),
    'source': 'folder',
  }
  return [sources.Domain('imagenet_v2', source, info)]
