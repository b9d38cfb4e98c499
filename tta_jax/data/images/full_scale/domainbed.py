"""Multi-domain image sets: DomainNet (TFDS) and DomainBed's folders (PACS,
VLCS, OfficeHome, TerraIncognita), or any `<root>/<domain>/<class>/` tree."""

from collections.abc import Sequence

from tta_jax.data import sources
from tta_jax.data.images import image_folder, tfds_sources
from tta_jax.data.images.full_scale._common import (
  _NUM_THREADS,
  _tfds_source,
)

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
