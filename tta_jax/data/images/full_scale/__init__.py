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
| imagenet               | TFDS `imagenet2012` (any split), or `<wnid>/`     |
| imagenet_v2            | TFDS `imagenet_v2`, or the released `<0..999>/`   |
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

Layout: `cifar`, `imagenet` (ImageNet-C, -R, -A, -Sketch) and `domainbed`
(DomainNet, DomainBed and other image folders) hold the loaders;
`registry` the `LOADERS` table and `load_domains`; `_common` what they
share (`SubsetSource`, `subset_indices`, the corruption-domain builder).
Import from the package.
"""

from tta_jax.data.images.full_scale._common import (
  CORRUPTIONS,
  EXTRA_CORRUPTIONS,
  SEVERITIES,
  SubsetSource,
  subset_indices,
)
from tta_jax.data.images.full_scale.cifar import (
  HendrycksNpySource,
  cifar10,
  cifar10_c,
  cifar10_corrupted,
  cifar100,
  cifar100_c,
  cifar100_corrupted,
  hendrycks_c,
)
from tta_jax.data.images.full_scale.domainbed import (
  DOMAINBED_DOMAINS,
  DOMAINNET_DOMAINS,
  domainnet,
  image_folder_domains,
  office_home,
  pacs,
  terra_incognita,
  vlcs,
)
from tta_jax.data.images.full_scale.imagenet import (
  IMAGENET_A_WNIDS,
  IMAGENET_R_WNIDS,
  imagenet2012_corrupted,
  imagenet_a,
  imagenet_c,
  imagenet_r,
  imagenet_sketch,
)
from tta_jax.data.images.full_scale.imagenet_clean import imagenet, imagenet_v2
from tta_jax.data.images.full_scale.registry import (
  LOADERS,
  load_domains,
)

__all__ = [
  'CORRUPTIONS',
  'DOMAINBED_DOMAINS',
  'DOMAINNET_DOMAINS',
  'EXTRA_CORRUPTIONS',
  'HendrycksNpySource',
  'IMAGENET_A_WNIDS',
  'IMAGENET_R_WNIDS',
  'LOADERS',
  'SEVERITIES',
  'SubsetSource',
  'cifar10',
  'cifar100',
  'cifar100_c',
  'cifar100_corrupted',
  'cifar10_c',
  'cifar10_corrupted',
  'domainnet',
  'hendrycks_c',
  'image_folder_domains',
  'imagenet2012_corrupted',
  'imagenet',
  'imagenet_a',
  'imagenet_c',
  'imagenet_r',
  'imagenet_sketch',
  'imagenet_v2',
  'load_domains',
  'office_home',
  'pacs',
  'subset_indices',
  'terra_incognita',
  'vlcs',
]
