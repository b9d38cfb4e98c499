"""Full-scale test sets, read lazily from disk: `load_domains(name, ...)`.

Every loader returns a list of `sources.Domain`s whose sources are random
access (`len`, `source[indices]` -> `{'image': float32 [n, H, W, C] in
[0, 1], 'label': int32 [n]}`) and read only the examples a batch asks for.
Nothing is downloaded and TensorFlow is not needed: TFDS datasets are read
through `tfds.data_source` (array_record), released `.npy` files are
memory-mapped, image folders are decoded with PIL on access. A dataset that
is not on disk is an error saying what to put where.

| name                   | data                                              |
| ---------------------- | ------------------------------------------------- |
| cifar10_corrupted      | TFDS `cifar10_corrupted/<c>_<s>`, test            |
| cifar10_c, cifar100_c  | Hendrycks' released `.npy` folder (CIFAR-10-C/)   |
| cifar100_corrupted     | TFDS `cifar100` test + `images.corruptions`       |
| cifar10, cifar100      | TFDS clean test split (one domain, 'clean')       |
| imagenet2012_corrupted | TFDS `imagenet2012_corrupted/<c>_<s>`, validation |
| imagenet_c             | Hendrycks' ImageNet-C folders `<c>/<s>/<wnid>/`   |
| imagenet_r, imagenet_a | TFDS, or the released folders `<wnid>/<file>`     |
| imagenet_sketch        | TFDS, or the released folder `sketch/<wnid>/`     |
| domainnet              | TFDS `domainnet/<domain>` (345 classes)           |
| pacs, vlcs,            | DomainBed folders `<root>/<domain>/<class>/`      |
| office_home,           |                                                   |
| terra_incognita        |                                                   |
| image_folder           | any `<root>/<domain>/<class>/` tree               |

Conventions:

- Corruption loaders take `severity` (default 5) or `severities` (several,
  e.g. the gradual setting's 1..5..1) and make one domain per (corruption,
  severity), corruption-major, named `<corruption>` (one severity) or
  `<corruption>@<severity>`.
- ImageNet variants keep ImageNet-1k labels (0..999). ImageNet-R and -A
  cover 200 classes: their `info['class_subset']` holds the 200 ImageNet-1k
  indices (sorted, int32); the runner restricts the 1000 logits to them,
  either masking the others to -inf (then argmax is directly comparable to
  the label) or as `logits[:, class_subset]` with the label mapped through
  `np.searchsorted(class_subset, label)`.
- `info` always holds `dataset`, `num_classes` and `preprocess`.
"""

import inspect
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
# TFDS's cifar10_corrupted renames two of them.
_TFDS_CIFAR10_C = {
  'glass_blur': 'frosted_glass_blur',
  'elastic_transform': 'elastic',
}

DOMAINNET_DOMAINS = (
  'clipart',
  'infograph',
  'painting',
  'quickdraw',
  'real',
  'sketch',
)
# DomainBed's ENVIRONMENTS (`domainbed/datasets.py`), the folder names its
# download script writes.
DOMAINBED_DOMAINS = {
  'pacs': ('art_painting', 'cartoon', 'photo', 'sketch'),
  'vlcs': ('Caltech101', 'LabelMe', 'SUN09', 'VOC2007'),
  'office_home': ('Art', 'Clipart', 'Product', 'Real World'),
  'terra_incognita': (
    'location_100',
    'location_38',
    'location_43',
    'location_46',
  ),
}

# The 200 wnids of ImageNet-R: `imagenet_r_wnids` in hendrycks/imagenet-r
# `eval.py` (its comment lists the same classes as ImageNet-1k indices).
IMAGENET_R_WNIDS = tuple(
  """
  n01443537 n01484850 n01494475 n01498041 n01514859 n01518878 n01531178
  n01534433 n01614925 n01616318 n01630670 n01632777 n01644373 n01677366
  n01694178 n01748264 n01770393 n01774750 n01784675 n01806143 n01820546
  n01833805 n01843383 n01847000 n01855672 n01860187 n01882714 n01910747
  n01944390 n01983481 n01986214 n02007558 n02009912 n02051845 n02056570
  n02066245 n02071294 n02077923 n02085620 n02086240 n02088094 n02088238
  n02088364 n02088466 n02091032 n02091134 n02092339 n02094433 n02096585
  n02097298 n02098286 n02099601 n02099712 n02102318 n02106030 n02106166
  n02106550 n02106662 n02108089 n02108915 n02109525 n02110185 n02110341
  n02110958 n02112018 n02112137 n02113023 n02113624 n02113799 n02114367
  n02117135 n02119022 n02123045 n02128385 n02128757 n02129165 n02129604
  n02130308 n02134084 n02138441 n02165456 n02190166 n02206856 n02219486
  n02226429 n02233338 n02236044 n02268443 n02279972 n02317335 n02325366
  n02346627 n02356798 n02363005 n02364673 n02391049 n02395406 n02398521
  n02410509 n02423022 n02437616 n02445715 n02447366 n02480495 n02480855
  n02481823 n02483362 n02486410 n02510455 n02526121 n02607072 n02655020
  n02672831 n02701002 n02749479 n02769748 n02793495 n02797295 n02802426
  n02808440 n02814860 n02823750 n02841315 n02843684 n02883205 n02906734
  n02909870 n02939185 n02948072 n02950826 n02951358 n02966193 n02980441
  n02992529 n03124170 n03272010 n03345487 n03372029 n03424325 n03452741
  n03467068 n03481172 n03494278 n03495258 n03498962 n03594945 n03602883
  n03630383 n03649909 n03676483 n03710193 n03773504 n03775071 n03888257
  n03930630 n03947888 n04086273 n04118538 n04133789 n04141076 n04146614
  n04147183 n04192698 n04254680 n04266014 n04275548 n04310018 n04325704
  n04347754 n04389033 n04409515 n04465501 n04487394 n04522168 n04536866
  n04552348 n04591713 n07614500 n07693725 n07695742 n07697313 n07697537
  n07714571 n07714990 n07718472 n07720875 n07734744 n07742313 n07745940
  n07749582 n07753275 n07753592 n07768694 n07873807 n07880968 n07920052
  n09472597 n09835506 n10565667 n12267677
""".split()
)
# The 200 wnids of ImageNet-A: the keys of `thousand_k_to_200` not mapped to
# -1 in hendrycks/natural-adv-examples `eval.py`, as wnids.
IMAGENET_A_WNIDS = tuple(
  """
  n01498041 n01531178 n01534433 n01558993 n01580077 n01614925 n01616318
  n01631663 n01641577 n01669191 n01677366 n01687978 n01694178 n01698640
  n01735189 n01770081 n01770393 n01774750 n01784675 n01819313 n01820546
  n01833805 n01843383 n01847000 n01855672 n01882714 n01910747 n01914609
  n01924916 n01944390 n01985128 n01986214 n02007558 n02009912 n02037110
  n02051845 n02077923 n02085620 n02099601 n02106550 n02106662 n02110958
  n02119022 n02123394 n02127052 n02129165 n02133161 n02137549 n02165456
  n02174001 n02177972 n02190166 n02206856 n02219486 n02226429 n02231487
  n02233338 n02236044 n02259212 n02268443 n02279972 n02280649 n02281787
  n02317335 n02325366 n02346627 n02356798 n02361337 n02410509 n02445715
  n02454379 n02486410 n02492035 n02504458 n02655020 n02669723 n02672831
  n02676566 n02690373 n02701002 n02730930 n02777292 n02782093 n02787622
  n02793495 n02797295 n02802426 n02814860 n02815834 n02837789 n02879718
  n02883205 n02895154 n02906734 n02948072 n02951358 n02980441 n02992211
  n02999410 n03014705 n03026506 n03124043 n03125729 n03187595 n03196217
  n03223299 n03250847 n03255030 n03291819 n03325584 n03355925 n03384352
  n03388043 n03417042 n03443371 n03444034 n03445924 n03452741 n03483316
  n03584829 n03590841 n03594945 n03617480 n03666591 n03670208 n03717622
  n03720891 n03721384 n03724870 n03775071 n03788195 n03804744 n03837869
  n03840681 n03854065 n03888257 n03891332 n03935335 n03982430 n04019541
  n04033901 n04039381 n04067472 n04086273 n04099969 n04118538 n04131690
  n04133789 n04141076 n04146614 n04147183 n04179913 n04208210 n04235860
  n04252077 n04252225 n04254120 n04270147 n04275548 n04310018 n04317175
  n04344873 n04347754 n04355338 n04366367 n04376876 n04389033 n04399382
  n04442312 n04456115 n04482393 n04507155 n04509417 n04532670 n04540053
  n04554684 n04562935 n04591713 n04606251 n07583066 n07695742 n07697313
  n07697537 n07714990 n07718472 n07720875 n07734744 n07749582 n07753592
  n07760859 n07768694 n07831146 n09229709 n09246464 n09472597 n09835506
  n11879895 n12057211 n12144580 n12267677
""".split()
)

_NUM_THREADS = image_folder.DEFAULT_NUM_THREADS


# --------------------------------------------------------------- sources


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


def subset_indices(n: int, num_examples: int | None, seed: int) -> np.ndarray:
  """All of range(n), or the first `num_examples` of a seeded permutation
  (`np.random.default_rng(seed)`), sorted."""
  if num_examples is None or num_examples >= n:
    return np.arange(n)
  if num_examples < 1:
    raise ValueError(f'num_examples must be positive, got {num_examples}')
  return np.sort(np.random.default_rng(seed).permutation(n)[:num_examples])


# --------------------------------------------------------------- helpers


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


# ------------------------------------------------------------ CIFAR


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


# ------------------------------------------------------------ ImageNet


def imagenet2012_corrupted(
  *,
  severity: int = 5,
  severities: Sequence[int] | None = None,
  corruptions: Sequence[str] | None = None,
  data_dir: str | None = None,
  num_examples: int | None = None,
  seed: int = 0,
  split: str = 'validation',
  num_threads: int = _NUM_THREADS,
) -> list[sources.Domain]:
  """ImageNet-C as TFDS builds it (`imagenet2012_corrupted/<c>_<s>`).

  Images are stored at 224x224 and are not resized again. TFDS generates
  the corruptions itself from the ImageNet validation set (it needs the
  ImageNet archives in its manual dir); its pixels are not Hendrycks'
  released ImageNet-C (`imagenet_c` reads those).

  Args:
    num_examples: None reads all 50,000 per domain. RobustBench (and
      mariodoebler/test-time-adaptation) evaluate 5,000; here a subset is
      the first `num_examples` of `np.random.default_rng(seed)
      .permutation(50000)`, sorted: the same record indices in every
      corruption, not RobustBench's file list (`imagenet_c` can use that).
    seed: the subset seed.
    Others as `cifar10_corrupted`.

  Returns:
    Domains, info: dataset, corruption, severity, num_classes (1000).
  """
  names = _corruptions(corruptions, CORRUPTIONS + EXTRA_CORRUPTIONS)
  preprocess = image_folder.Preprocess(224)  # a no-op on 224x224 data

  def make(c, s):
    tfds_name = f'imagenet2012_corrupted/{c}_{s}'
    src = _tfds_source(
      tfds_name, split, data_dir, preprocess=preprocess, num_threads=num_threads
    )
    keep = subset_indices(len(src), num_examples, seed)
    if len(keep) < len(src):
      src = SubsetSource(src, keep)
    return src, {
      'dataset': 'imagenet2012_corrupted',
      'num_classes': 1000,
      'preprocess': 'none (stored 224x224)',
      'tfds_name': tfds_name,
    }

  return _corruption_domains(make, names, _severities(severity, severities))


def _imagenet_label_map() -> dict[str, int]:
  return {w: i for i, w in enumerate(tfds_sources.imagenet_wnids())}


def imagenet_c(
  *,
  data_dir: str | None = None,
  severity: int = 5,
  severities: Sequence[int] | None = None,
  corruptions: Sequence[str] | None = None,
  num_examples: int | None = None,
  seed: int = 0,
  image_list: str | None = None,
  num_threads: int = _NUM_THREADS,
) -> list[sources.Domain]:
  """Hendrycks' released ImageNet-C: `<data_dir>/<c>/<s>/<wnid>/<file>`.

  The released images are 224x224 already and are not resized again.

  Args:
    data_dir: the extracted ImageNet-C folder.
    num_examples: None reads all 50,000; else the seeded subset of
      `subset_indices` over the sorted file list (the same images in every
      corruption).
    image_list: a text file of `<wnid>/<file>` lines, e.g. RobustBench's
      `imagenet_test_image_ids.txt` (its 5,000-image convention, used by
      mariodoebler/test-time-adaptation); then exactly those images are
      read, in the file's order. Excludes `num_examples`.
    Others as `cifar10_corrupted`.

  Returns:
    Domains, info: dataset, corruption, severity, num_classes (1000).
  """
  layout = (
    "Hendrycks' ImageNet-C release extracted as "
    '<data_dir>/<corruption>/<severity>/<wnid>/<image>.JPEG'
  )
  data_dir = _require_dir(data_dir, 'imagenet_c', layout)
  if image_list is not None and num_examples is not None:
    raise ValueError('imagenet_c: pass image_list or num_examples, not both')
  names = _corruptions(corruptions, CORRUPTIONS + EXTRA_CORRUPTIONS)
  label_of = _imagenet_label_map()
  listed = None
  if image_list is not None:
    with open(image_list) as f:
      listed = [line.strip() for line in f if line.strip()]
    if not listed:
      raise ValueError(f'imagenet_c: {image_list} lists no images')
  preprocess = image_folder.Preprocess(224)  # a no-op on 224x224 data

  def make(c, s):
    folder = os.path.join(data_dir, c, str(s))
    if not os.path.isdir(folder):
      raise FileNotFoundError(
        f'imagenet_c: no folder {folder!r}; expected {layout}'
      )
    if listed is not None:
      rel = listed
      missing = [r for r in rel if not os.path.isfile(os.path.join(folder, r))]
      if missing:
        raise FileNotFoundError(
          f'imagenet_c: {len(missing)} images of {image_list} missing in '
          f'{folder!r}, e.g. {missing[:3]}'
        )
    else:
      rel = [
        os.path.relpath(p, folder) for p in image_folder.list_images(folder)
      ]
      rel = [rel[i] for i in subset_indices(len(rel), num_examples, seed)]
    labels = []
    for r in rel:
      wnid = r.replace(os.sep, '/').split('/')[0]
      if wnid not in label_of:
        raise ValueError(
          f'imagenet_c: {r!r} is not under an ImageNet wnid '
          f'folder; expected {layout}'
        )
      labels.append(label_of[wnid])
    src = image_folder.ImageFolderSource(
      [os.path.join(folder, r) for r in rel],
      labels,
      num_classes=1000,
      preprocess=preprocess,
      num_threads=num_threads,
      name=f'imagenet_c/{c}_{s}',
    )
    return src, {
      'dataset': 'imagenet_c',
      'num_classes': 1000,
      'preprocess': 'none (stored 224x224)',
    }

  return _corruption_domains(make, names, _severities(severity, severities))


def _class_subset(wnids: Sequence[str], names: Sequence[str]) -> np.ndarray:
  index = {w: i for i, w in enumerate(names)}
  missing = [w for w in wnids if w not in index]
  if missing:
    raise ValueError(f'wnids {missing[:5]} not among the dataset labels')
  return np.sort(np.asarray([index[w] for w in wnids], np.int32))


def _imagenet_variant(
  dataset: str,
  tfds_name: str,
  subset_wnids: Sequence[str] | None,
  *,
  data_dir: str | None,
  folder: str | None,
  split: str,
  image_size: int,
  resize_size: int | None,
  num_threads: int,
) -> list[sources.Domain]:
  preprocess = image_folder.Preprocess(image_size, resize_size).check()
  wnids = tfds_sources.imagenet_wnids()
  info = {
    'dataset': dataset,
    'num_classes': 1000,
    'preprocess': preprocess.describe(),
  }
  if folder is not None:
    layout = f'the released {dataset} folder: <folder>/<wnid>/<images>'
    folder = _require_dir(folder, dataset, layout)
    label_of = {w: i for i, w in enumerate(wnids)}
    present = image_folder.subdirectories(folder)
    unknown = [w for w in present if w not in label_of]
    if unknown or not present:
      raise ValueError(
        f'{dataset}: class folders must be ImageNet wnids; found '
        f'{unknown[:5] or "none"} in {folder!r}; expected {layout}'
      )
    files, labels = [], []
    for w in present:
      found = image_folder.list_images(os.path.join(folder, w))
      files += found
      labels += [label_of[w]] * len(found)
    if not files:
      raise FileNotFoundError(f'{dataset}: no images under {folder!r}')
    source = image_folder.ImageFolderSource(
      files,
      labels,
      num_classes=1000,
      preprocess=preprocess,
      num_threads=num_threads,
      name=dataset,
    )
    if subset_wnids is not None:
      # The folders present are the classes; the released sets have exactly
      # the 200 of the official list.
      info['class_subset'] = _class_subset(present, wnids)
    info['source'] = 'folder'
  else:
    ds = tfds_sources.open_data_source(tfds_name, split, data_dir)
    names = tfds_sources.class_names(ds)
    if names != wnids:
      raise ValueError(
        f'{tfds_name}: its labels are not the 1000 ImageNet wnids of '
        'tensorflow_datasets/datasets/imagenet2012/labels.txt'
      )
    source = tfds_sources.TfdsSource(
      ds,
      num_classes=1000,
      preprocess=preprocess,
      num_threads=num_threads,
      name=f'{tfds_name}:{split}',
    )
    if subset_wnids is not None:
      info['class_subset'] = _class_subset(subset_wnids, names)
    info['source'] = 'tfds'
  return [sources.Domain(dataset, source, info)]


def imagenet_r(
  *,
  data_dir: str | None = None,
  folder: str | None = None,
  split: str = 'test',
  image_size: int = 224,
  resize_size: int | None = 256,
  num_threads: int = _NUM_THREADS,
) -> list[sources.Domain]:
  """ImageNet-R (renditions, 200 classes), resize 256 + centre crop 224.

  From TFDS `imagenet_r` (data_dir), or from the released `imagenet-r/`
  folder (`folder=`). Labels are ImageNet-1k indices; `info['class_subset']`
  the 200 classes (see the module docstring).
  """
  return _imagenet_variant(
    'imagenet_r',
    'imagenet_r',
    IMAGENET_R_WNIDS,
    data_dir=data_dir,
    folder=folder,
    split=split,
    image_size=image_size,
    resize_size=resize_size,
    num_threads=num_threads,
  )


def imagenet_a(
  *,
  data_dir: str | None = None,
  folder: str | None = None,
  split: str = 'test',
  image_size: int = 224,
  resize_size: int | None = 256,
  num_threads: int = _NUM_THREADS,
) -> list[sources.Domain]:
  """ImageNet-A (natural adversarial, 200 classes), as `imagenet_r`."""
  return _imagenet_variant(
    'imagenet_a',
    'imagenet_a',
    IMAGENET_A_WNIDS,
    data_dir=data_dir,
    folder=folder,
    split=split,
    image_size=image_size,
    resize_size=resize_size,
    num_threads=num_threads,
  )


def imagenet_sketch(
  *,
  data_dir: str | None = None,
  folder: str | None = None,
  split: str = 'test',
  image_size: int = 224,
  resize_size: int | None = 256,
  num_threads: int = _NUM_THREADS,
) -> list[sources.Domain]:
  """ImageNet-Sketch (all 1000 classes), resize 256 + centre crop 224.

  From TFDS `imagenet_sketch`, or the released `sketch/` folder.
  """
  return _imagenet_variant(
    'imagenet_sketch',
    'imagenet_sketch',
    None,
    data_dir=data_dir,
    folder=folder,
    split=split,
    image_size=image_size,
    resize_size=resize_size,
    num_threads=num_threads,
  )


# ------------------------------------------------------------ DomainNet


def domainnet(
  *,
  domains: Sequence[str] = DOMAINNET_DOMAINS,
  data_dir: str | None = None,
  split: str = 'test',
  image_size: int = 224,
  resize_size: int | None = None,
  num_threads: int = _NUM_THREADS,
) -> list[sources.Domain]:
  """DomainNet (cleaned, 345 classes) from TFDS `domainnet/<domain>`.

  Default: resized to 224x224 (DomainBed's eval transform); `resize_size=256`
  gives resize + centre crop instead.
  """
  unknown = [d for d in domains if d not in DOMAINNET_DOMAINS]
  if unknown or not domains:
    raise ValueError(
      f'unknown DomainNet domains {unknown}; valid: {list(DOMAINNET_DOMAINS)}'
    )
  preprocess = image_folder.Preprocess(image_size, resize_size).check()
  out = []
  for d in domains:
    src = _tfds_source(
      f'domainnet/{d}',
      split,
      data_dir,
      preprocess=preprocess,
      num_threads=num_threads,
    )
    out.append(
      sources.Domain(
        d,
        src,
        {
          'dataset': 'domainnet',
          'domain': d,
          'split': split,
          'num_classes': src.num_classes,
          'class_names': tfds_sources.class_names(src.data_source),
          'preprocess': preprocess.describe(),
        },
      )
    )
  return out


# ---------------------------------------------------- DomainBed folders


def image_folder_domains(
  *,
  data_dir: str | None = None,
  domains: Sequence[str] | None = None,
  image_size: int | None = 224,
  resize_size: int | None = None,
  split: str = 'all',
  holdout_fraction: float = 0.2,
  seed: int = 0,
  num_threads: int = _NUM_THREADS,
) -> list[sources.Domain]:
  """Any `<data_dir>/<domain>/<class>/<images>` tree (see
  `image_folder.image_folder_domains`)."""
  return image_folder.image_folder_domains(
    data_dir,
    domains=domains,
    image_size=image_size,
    resize_size=resize_size,
    split=split,
    holdout_fraction=holdout_fraction,
    seed=seed,
    num_threads=num_threads,
  )


def _domainbed(dataset: str):
  def load(
    *,
    data_dir: str | None = None,
    domains: Sequence[str] | None = None,
    image_size: int | None = 224,
    resize_size: int | None = None,
    split: str = 'all',
    holdout_fraction: float = 0.2,
    seed: int = 0,
    num_threads: int = _NUM_THREADS,
  ) -> list[sources.Domain]:
    return image_folder.image_folder_domains(
      data_dir,
      domains=domains,
      image_size=image_size,
      resize_size=resize_size,
      split=split,
      holdout_fraction=holdout_fraction,
      seed=seed,
      num_threads=num_threads,
      dataset=dataset,
      expected_domains=DOMAINBED_DOMAINS[dataset],
    )

  load.__name__ = dataset
  load.__doc__ = (
    f'{dataset} as DomainBed lays it out: <data_dir>/<domain>/<class>/'
    f'<images>, domains {DOMAINBED_DOMAINS[dataset]}. Classes sorted and '
    "shared; resized to 224x224; `split`: all, or DomainBed's train / "
    'holdout parts (see `image_folder.image_folder_domains`).'
  )
  return load


pacs = _domainbed('pacs')
vlcs = _domainbed('vlcs')
office_home = _domainbed('office_home')
terra_incognita = _domainbed('terra_incognita')


# ------------------------------------------------------------ registry

LOADERS: dict[str, Callable[..., list[sources.Domain]]] = {
  'cifar10_corrupted': cifar10_corrupted,
  'cifar10_c': cifar10_c,
  'cifar100_c': cifar100_c,
  'cifar100_corrupted': cifar100_corrupted,
  'cifar10': cifar10,
  'cifar100': cifar100,
  'imagenet2012_corrupted': imagenet2012_corrupted,
  'imagenet_c': imagenet_c,
  'imagenet_r': imagenet_r,
  'imagenet_a': imagenet_a,
  'imagenet_sketch': imagenet_sketch,
  'domainnet': domainnet,
  'pacs': pacs,
  'vlcs': vlcs,
  'office_home': office_home,
  'terra_incognita': terra_incognita,
  'image_folder': image_folder_domains,
}


def load_domains(name: str, **kwargs: Any) -> list[sources.Domain]:
  """The domains of dataset `name` (a key of `LOADERS`), lazily readable.

  Keyword arguments go to the loader; unknown ones are an error naming the
  loader's parameters.
  """
  if name not in LOADERS:
    raise ValueError(f'unknown dataset {name!r}; valid: {sorted(LOADERS)}')
  fn = LOADERS[name]
  params = inspect.signature(fn).parameters
  unknown = sorted(set(kwargs) - set(params))
  if unknown:
    raise TypeError(
      f'{name}: unknown arguments {unknown}; valid: {sorted(params)}'
    )
  return fn(**kwargs)
