"""Image folders as lazy random-access sources, and the shared image pipeline.

The layout of PACS, VLCS, Office-Home and TerraIncognita as DomainBed ships
them: `<root>/<domain>/<class>/<image files>`. Images are decoded with PIL
only when a batch asks for them, converted to RGB and resized to one shape,
so a domain of any size costs nothing until it is read.

The pieces every full-scale source shares live here too: `Preprocess` (the
eval-time resize / centre crop), index checking, the threaded map that
decodes a batch, and the output check that makes every source return
`{'image': float32 [n, H, W, C] in [0, 1], 'label': int32 [n]}`.
"""

import concurrent.futures
import os
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from tta_jax.data import sources

# torchvision's IMG_EXTENSIONS, compared lower-case.
IMAGE_EXTENSIONS = (
  '.jpg',
  '.jpeg',
  '.png',
  '.ppm',
  '.bmp',
  '.pgm',
  '.tif',
  '.tiff',
  '.webp',
)
# PIL decoding and resizing release the GIL, so threads scale.
DEFAULT_NUM_THREADS = min(8, os.cpu_count() or 1)
SPLITS = ('all', 'train', 'holdout')


class Preprocess(NamedTuple):
  """Eval-time resizing of one decoded image to a fixed RGB shape.

  - `image_size=None`: the decoded size is kept (data stored at its final
    size: CIFAR, ImageNet-C).
  - `resize_size=None`: resize to `image_size` x `image_size` (DomainBed's
    eval transform, `Resize((224, 224))`).
  - `resize_size=r`: shorter side to r, then the centre `image_size` square
    (torchvision's `Resize(256)` + `CenterCrop(224)`, with its size and
    offset rounding).

  Resizing is PIL bilinear with antialiasing, what torchvision does on PIL
  images.
  """

  image_size: int | None = None
  resize_size: int | None = None

  def __call__(self, image: Image.Image | np.ndarray) -> np.ndarray:
    """Returns uint8 [H, W, 3]."""
    if isinstance(image, np.ndarray):
      if (
        self.image_size is None
        and image.dtype == np.uint8
        and image.ndim == 3
        and image.shape[-1] == 3
      ):
        return image  # already final (the CIFAR / ImageNet-C fast path)
      image = _to_pil(image)
    if image.mode != 'RGB':
      image = image.convert('RGB')
    s = self.image_size
    if s is not None:
      if self.resize_size is None:
        if image.size != (s, s):
          image = image.resize((s, s), Image.Resampling.BILINEAR)
      else:
        w, h = image.size
        r = self.resize_size
        long_side = int(r * max(w, h) / min(w, h))
        size = (r, long_side) if w <= h else (long_side, r)
        if size != (w, h):
          image = image.resize(size, Image.Resampling.BILINEAR)
        w, h = image.size
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        image = image.crop((left, top, left + s, top + s))
    return np.asarray(image, np.uint8)

  def check(self) -> 'Preprocess':
    if self.image_size is not None and self.image_size < 1:
      raise ValueError(f'image_size must be positive, got {self.image_size}')
    if self.resize_size is not None:
      if self.image_size is None:
        raise ValueError('resize_size needs an image_size to crop to')
      if self.resize_size < self.image_size:
        raise ValueError(
          f'resize_size {self.resize_size} is smaller than the crop '
          f'image_size {self.image_size}'
        )
    return self

  def describe(self) -> str:
    if self.image_size is None:
      return 'none'
    if self.resize_size is None:
      return f'resize {self.image_size}x{self.image_size}'
    return (
      f'resize shorter side {self.resize_size}, centre crop {self.image_size}'
    )


# Keep the decoded size (an immutable default).
NO_RESIZE = Preprocess()


def _to_pil(array: np.ndarray) -> Image.Image:
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f'expected uint8 pixels, got {array.dtype}')
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3):
    raise ValueError(f'expected an [H, W(, C)] image, got {array.shape}')
  return Image.fromarray(array)


def as_indices(indices: Any, n: int, who: str) -> np.ndarray:
  """Checks a 1-D integer index array against a source of length n."""
  idx = np.asarray(indices)
  if idx.ndim != 1 or not (
    np.issubdtype(idx.dtype, np.integer) or idx.size == 0
  ):
    raise TypeError(
      f'{who}: indices must be a 1-D integer array, got shape {idx.shape} '
      f'dtype {idx.dtype}'
    )
  if idx.size == 0:
    raise ValueError(f'{who}: empty index array')
  if idx.min() < 0 or idx.max() >= n:
    raise IndexError(
      f'{who}: indices must lie in [0, {n}), got [{idx.min()}, {idx.max()}]'
    )
  return idx.astype(np.int64)


def parallel_map(
  fn: Callable[[Any], Any], items: Sequence[Any], num_threads: int
) -> list[Any]:
  if num_threads <= 1 or len(items) <= 1:
    return [fn(x) for x in items]
  with concurrent.futures.ThreadPoolExecutor(
    min(num_threads, len(items))
  ) as pool:
    return list(pool.map(fn, items))


def validate_batch(batch: sources.Batch, who: str) -> sources.Batch:
  """Fails unless `batch` is float32 [n, H, W, C] in [0, 1] + int32 [n]."""
  image, label = batch['image'], batch['label']
  if image.dtype != np.float32 or image.ndim != 4:
    raise ValueError(
      f'{who}: expected float32 [n, H, W, C] images, got {image.dtype} '
      f'{image.shape}'
    )
  if not np.all((image >= 0) & (image <= 1)):  # NaN fails too
    raise ValueError(f'{who}: pixel values outside [0, 1]')
  if label.dtype != np.int32 or label.shape != image.shape[:1]:
    raise ValueError(
      f'{who}: expected int32 labels of shape {image.shape[:1]}, got '
      f'{label.dtype} {label.shape}'
    )
  return batch


def finish_batch(
  images: Sequence[np.ndarray],
  labels: Sequence[int],
  num_classes: int,
  who: str,
) -> sources.Batch:
  """Stacks uint8 [H, W, C] images into a checked float batch.

  The checks run on the uint8 stack: x / 255 of uint8 lies in [0, 1] by
  construction, so no elementwise pass over the float pixels is needed.
  """
  shapes = {im.shape for im in images}
  if len(shapes) != 1:
    raise ValueError(
      f'{who}: images of different shapes {sorted(shapes)} in one batch; '
      'set image_size so they are resized to one shape'
    )
  stacked = np.stack(images)
  if stacked.dtype != np.uint8 or stacked.ndim != 4:
    raise ValueError(
      f'{who}: expected uint8 [H, W, C] images, got {stacked.dtype} '
      f'{stacked.shape[1:]}'
    )
  labels = np.asarray(labels, np.int64)
  if labels.shape != stacked.shape[:1]:
    raise ValueError(f'{who}: {len(stacked)} images, {labels.shape} labels')
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(
      f'{who}: labels must lie in [0, {num_classes}), got '
      f'[{labels.min()}, {labels.max()}]'
    )
  image = np.empty(stacked.shape, np.float32)
  np.divide(stacked, np.float32(255), out=image)
  return {'image': image, 'label': labels.astype(np.int32)}


def load_image(path: str, preprocess: Preprocess) -> np.ndarray:
  """Decodes one image file to uint8 [H, W, 3] (PIL, converted to RGB)."""
  with Image.open(path) as image:
    return preprocess(image)


class ImageFolderSource:
  """A lazy source over image files with known labels.

  Only the file list and labels are held; pixels are decoded per batch.
  """

  def __init__(
    self,
    files: Sequence[str],
    labels: Sequence[int],
    *,
    num_classes: int,
    preprocess: Preprocess = NO_RESIZE,
    num_threads: int = DEFAULT_NUM_THREADS,
    name: str = '',
  ):
    if len(files) != len(labels):
      raise ValueError(f'{len(files)} files but {len(labels)} labels')
    if not files:
      raise ValueError(f'image folder source {name!r} has no images')
    self.files = list(files)
    self.labels = np.asarray(labels, np.int32)  # [n], for label-aware streams
    self.num_classes = num_classes
    self.preprocess = preprocess.check()
    self.num_threads = num_threads
    self.name = name

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, indices: np.ndarray) -> sources.Batch:
    who = f'ImageFolderSource({self.name!r})'
    idx = as_indices(indices, len(self), who)
    images = parallel_map(
      lambda i: load_image(self.files[i], self.preprocess),
      idx,
      self.num_threads,
    )
    return finish_batch(images, self.labels[idx], self.num_classes, who)


def _visible(names):
  return sorted(n for n in names if not n.startswith('.'))


def subdirectories(directory: str) -> list[str]:
  """Sorted names of the non-hidden subdirectories of `directory`."""
  with os.scandir(directory) as it:
    return _visible(e.name for e in it if e.is_dir())


def list_images(directory: str) -> list[str]:
  """Image files under `directory` (recursive, sorted, symlinks followed).

  Hidden files are skipped: the `._name.jpg` AppleDouble files in some
  PACS / Office-Home archives are not images.
  """
  out = []
  for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
    dirnames[:] = _visible(dirnames)
    for f in _visible(filenames):
      if f.lower().endswith(IMAGE_EXTENSIONS):
        out.append(os.path.join(dirpath, f))
  return sorted(out)


def split_indices(
  n: int, *, split: str, holdout_fraction: float, seed: int, key: str
) -> np.ndarray:
  """DomainBed's per-domain split: the first `int(n * holdout_fraction)`
  examples of a seeded shuffle are held out.

  The shuffle is keyed by (seed, crc32(key)), so a domain's split does not
  depend on which other domains are loaded. Indices come back sorted.
  """
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; valid: {SPLITS}')
  if split == 'all':
    return np.arange(n)
  if not 0 < holdout_fraction < 1:
    raise ValueError(
      f'holdout_fraction must lie in (0, 1) for split {split!r}, got '
      f'{holdout_fraction}'
    )
  perm = np.random.default_rng([seed, zlib.crc32(key.encode())]).permutation(n)
  n_out = int(n * holdout_fraction)
  return np.sort(perm[:n_out] if split == 'holdout' else perm[n_out:])


_LAYOUT = (
  'expected <root>/<domain>/<class>/<image files>, e.g. '
  "PACS/art_painting/dog/pic_001.jpg (the layout of DomainBed's "
  'download script)'
)


def image_folder_domains(
  root: str | None,
  *,
  domains: Sequence[str] | None = None,
  image_size: int | None = 224,
  resize_size: int | None = None,
  split: str = 'all',
  holdout_fraction: float = 0.2,
  seed: int = 0,
  num_threads: int = DEFAULT_NUM_THREADS,
  dataset: str = 'image_folder',
  expected_domains: Sequence[str] | None = None,
) -> list[sources.Domain]:
  """One `Domain` per `<root>/<domain>` folder, classes shared by all.

  Classes are the sorted class-folder names, the same list (and so the same
  label ids) in every domain; domains that disagree on the class set are an
  error. Labels follow that list, images the sorted file paths.

  Args:
    root: the dataset folder.
    domains: the domains to load, in this order; default all (in
      `expected_domains` order if given, else sorted).
    image_size: output side; None keeps the decoded size (then all images
      must already share one shape).
    resize_size: None resizes to `image_size` squared (DomainBed); an int
      resizes the shorter side to it and centre-crops `image_size`.
    split: 'all', or DomainBed's per-domain 'train' (in) / 'holdout' (out)
      parts of a seeded shuffle.
    holdout_fraction: the held-out share (DomainBed: 0.2).
    seed: the split seed.
    num_threads: decoding threads per batch.
    dataset: the name recorded in `Domain.info`.
    expected_domains: the domain folders the dataset must have (checked when
      `domains` is None).

  Returns:
    Domains whose info holds dataset, domain, split, num_classes,
    class_names, preprocess.
  """
  if root is None:
    raise ValueError(
      f'{dataset}: no data folder given (data_dir=None); {_LAYOUT}'
    )
  if not os.path.isdir(root):
    raise FileNotFoundError(
      f'{dataset}: {root!r} is not a directory; {_LAYOUT}'
    )
  preprocess = Preprocess(image_size, resize_size).check()
  found = subdirectories(root)
  if domains is None:
    if expected_domains is not None:
      missing = [d for d in expected_domains if d not in found]
      if missing:
        raise FileNotFoundError(
          f'{dataset}: domain folders {missing} missing under {root!r} '
          f'(found {found}); expected {list(expected_domains)}; {_LAYOUT}'
        )
      domains = list(expected_domains)
    else:
      domains = found
  else:
    domains = list(domains)
    missing = [d for d in domains if d not in found]
    if missing:
      raise FileNotFoundError(
        f'{dataset}: domain folders {missing} missing under {root!r} '
        f'(found {found}); {_LAYOUT}'
      )
  if not domains:
    raise FileNotFoundError(
      f'{dataset}: no domain folders in {root!r}; {_LAYOUT}'
    )
  classes = {d: subdirectories(os.path.join(root, d)) for d in domains}
  ref = classes[domains[0]]
  if not ref:
    raise FileNotFoundError(
      f'{dataset}: no class folders in {os.path.join(root, domains[0])!r}; '
      f'{_LAYOUT}'
    )
  for d in domains[1:]:
    if classes[d] != ref:
      extra = sorted(set(classes[d]) - set(ref))
      lost = sorted(set(ref) - set(classes[d]))
      raise ValueError(
        f'{dataset}: domains must share one class set; {d!r} has extra '
        f'classes {extra} and lacks {lost} relative to {domains[0]!r}'
      )
  out = []
  for d in domains:
    files, labels = [], []
    for k, c in enumerate(ref):
      found_files = list_images(os.path.join(root, d, c))
      files += found_files
      labels += [k] * len(found_files)
    if not files:
      raise FileNotFoundError(
        f'{dataset}: domain {d!r} has no images (extensions '
        f'{IMAGE_EXTENSIONS}); {_LAYOUT}'
      )
    keep = split_indices(
      len(files),
      split=split,
      holdout_fraction=holdout_fraction,
      seed=seed,
      key=d,
    )
    if not len(keep):
      raise ValueError(f'{dataset}: split {split!r} of domain {d!r} is empty')
    source = ImageFolderSource(
      [files[i] for i in keep],
      np.asarray(labels)[keep],
      num_classes=len(ref),
      preprocess=preprocess,
      num_threads=num_threads,
      name=f'{dataset}/{d}',
    )
    out.append(
      sources.Domain(
        d,
        source,
        {
          'dataset': dataset,
          'domain': d,
          'split': split,
          'num_classes': len(ref),
          'class_names': list(ref),
          'preprocess': preprocess.describe(),
        },
      )
    )
  return out
