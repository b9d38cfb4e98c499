"""ImageNet variants: ImageNet-C (TFDS or Hendrycks' release), ImageNet-R,
ImageNet-A and ImageNet-Sketch (TFDS or the released folders), all with
ImageNet-1k labels."""

import os
from collections.abc import Sequence

import numpy as np

from tta_jax.data import sources
from tta_jax.data.images import image_folder, tfds_sources
from tta_jax.data.images.full_scale._common import (
  _NUM_THREADS,
  CORRUPTIONS,
  EXTRA_CORRUPTIONS,
  SubsetSource,
  _corruption_domains,
  _corruptions,
  _require_dir,
  _severities,
  _tfds_source,
  subset_indices,
)

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
  the 200 classes (see the package docstring).
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
