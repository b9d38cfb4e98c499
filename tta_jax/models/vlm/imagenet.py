"""ImageNet's class names and prompt templates for CLIP-style classifiers.

Read from package data (`data/`): the 1000 ImageNet-1k classes in label
order (the sorted wnids, the label order of TFDS, torchvision and timm)
with the cleaned names OpenAI's CLIP prompts with, and CLIP's 80 ImageNet
prompt templates; both as open_clip ships them (MIT licence; provenance in
the files' headers). ImageNet-A and -R score 200 of the classes:
`subset_indices(wnids)` gives their label indices, `classnames(wnids)`
their names.

    names = imagenet.classnames()           # 1000 names, label order
    templates = imagenet.templates()        # 80 '...{}...' prompts
"""

import functools
from collections.abc import Sequence
from importlib import resources

import numpy as np

_CLASSES = 'imagenet_classes.tsv'
_TEMPLATES = 'imagenet_templates.txt'


def _lines(name: str) -> list[str]:
  text = resources.files(__package__).joinpath('data', name).read_text('utf-8')
  return [ln for ln in text.splitlines() if ln and not ln.startswith('#')]


@functools.cache
def _table() -> tuple[tuple[str, ...], tuple[str, ...]]:
  rows = [ln.split('\t') for ln in _lines(_CLASSES)]
  if len(rows) != 1000 or any(len(r) != 2 for r in rows):
    raise ValueError(f'{_CLASSES}: expected 1000 "wnid<TAB>name" rows')
  wnids, names = zip(*rows, strict=True)
  return tuple(wnids), tuple(names)


def wnids() -> tuple[str, ...]:
  """The 1000 ImageNet-1k wnids in label order."""
  return _table()[0]


def subset_indices(subset_wnids: Sequence[str]) -> np.ndarray:
  """Sorted int32 label indices of `subset_wnids` (ImageNet-A / -R's 200).

  Raises:
    ValueError: a wnid is not an ImageNet-1k class.
  """
  index = {w: i for i, w in enumerate(wnids())}
  unknown = [w for w in subset_wnids if w not in index]
  if unknown:
    raise ValueError(f'not ImageNet-1k wnids: {unknown[:5]}')
  return np.sort(np.asarray([index[w] for w in subset_wnids], np.int32))


def classnames(subset_wnids: Sequence[str] | None = None) -> tuple[str, ...]:
  """CLIP's class names: all 1000 in label order, or those of
  `subset_wnids` in label order (the order of the subset's logits)."""
  names = _table()[1]
  if subset_wnids is None:
    return names
  return tuple(names[i] for i in subset_indices(subset_wnids))


@functools.cache
def templates() -> tuple[str, ...]:
  """CLIP's 80 ImageNet prompt templates (`'a photo of a {}.'`, ...)."""
  out = tuple(_lines(_TEMPLATES))
  if len(out) != 80 or any(t.count('{}') != 1 for t in out):
    raise ValueError(f'{_TEMPLATES}: expected 80 templates with one "{{}}"')
  return out


# Names a model config may give instead of a list (`vlm.clip_classifier`'s
# `classnames='imagenet'`, `templates='imagenet'`), so a checkpoint's
# metadata records where its classes came from.
NAMED_CLASSNAMES = {'imagenet': classnames}
NAMED_TEMPLATES = {'imagenet': templates}
