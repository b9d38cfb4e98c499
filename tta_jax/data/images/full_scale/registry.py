"""Every full-scale loader by name, and `load_domains(name, **kwargs)`."""

import inspect
from collections.abc import Callable
from typing import Any

from tta_jax.data import sources
from tta_jax.data.images.full_scale.cifar import (
  cifar10,
  cifar10_c,
  cifar10_corrupted,
  cifar100,
  cifar100_c,
  cifar100_corrupted,
)
from tta_jax.data.images.full_scale.domainbed import (
  domainnet,
  image_folder_domains,
  office_home,
  pacs,
  terra_incognita,
  vlcs,
)
from tta_jax.data.images.full_scale.imagenet import (
  imagenet2012_corrupted,
  imagenet_a,
  imagenet_c,
  imagenet_r,
  imagenet_sketch,
)
from tta_jax.data.images.full_scale.imagenet_clean import imagenet, imagenet_v2

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
  'imagenet': imagenet,
  'imagenet_v2': imagenet_v2,
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
