"""Selecting the parameters a method adapts, from tree structure alone.

A mask function maps `(params, batch_stats)` to a tree of Python bools with the
structure of `params`. It looks only at structure (paths and which modules own
batch statistics), so it runs at trace time and costs nothing under `jit`.
`split` and `merge` are exact inverses (haiku's partition/merge): gradients
are formed for the trainable subset only, and optimizer states stay small.
"""

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flax import traverse_util

Params = Any
MaskFn = Callable[[Params, Params], Params]

_SEP = '/'


def _flat(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(dict(tree)) if tree else {}


def _unflat(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict(dict(flat)) if flat else {}


def paths(params: Params) -> list[str]:
  """Returns the '/'-joined paths of all leaves, in flatten order."""
  return [_SEP.join(k) for k in _flat(params)]


def _mask_from(params: Params, pred: Callable[[tuple[str, ...]], bool]):
  return _unflat({k: bool(pred(k)) for k in _flat(params)})


def bn_affine(params: Params, batch_stats: Params) -> Params:
  """Selects `scale` and `bias` of every module that owns batch statistics.

  A module counts as a normalisation layer because its path also appears in
  `batch_stats`, not because of its name, so `bn1`, `norm_proj` or
  `BatchNorm_0` are all found. Other parameters of such a module (Meta-TTT's
  mixing weight `alpha`) are not selected.
  """
  bn_modules = {k[:-1] for k in _flat(batch_stats)}
  return _mask_from(
    params, lambda k: k[:-1] in bn_modules and k[-1] in ('scale', 'bias')
  )


def no_params(params: Params, batch_stats: Params) -> Params:
  """Selects nothing (methods that adapt statistics or outputs only)."""
  del batch_stats
  return _mask_from(params, lambda k: False)


def all_params(params: Params, batch_stats: Params) -> Params:
  """Selects every parameter (CoTTA adapts the whole network)."""
  del batch_stats
  return _mask_from(params, lambda k: True)


def classifier(head: str = 'head') -> MaskFn:
  """Selects the parameters of the top-level module named `head`."""

  def mask_fn(params, batch_stats):
    del batch_stats
    return _mask_from(params, lambda k: k[0] == head)

  return mask_fn


def by_regex(*patterns: str) -> MaskFn:
  """Selects leaves whose '/'-joined path matches any pattern (re.search)."""
  compiled = [re.compile(p) for p in patterns]

  def mask_fn(params, batch_stats):
    del batch_stats
    return _mask_from(
      params, lambda k: any(c.search(_SEP.join(k)) for c in compiled)
    )

  return mask_fn


def _combine(fns: Iterable[MaskFn], op: Callable[[list[bool]], bool]):
  fns = tuple(fns)

  def mask_fn(params, batch_stats):
    flats = [_flat(f(params, batch_stats)) for f in fns]
    return _unflat({k: op([m[k] for m in flats]) for k in _flat(params)})

  return mask_fn


def union(*fns: MaskFn) -> MaskFn:
  """Selects what any of `fns` selects."""
  return _combine(fns, any)


def intersection(*fns: MaskFn) -> MaskFn:
  """Selects what all of `fns` select."""
  return _combine(fns, all)


def difference(fn: MaskFn, *exclude: MaskFn) -> MaskFn:
  """Selects what `fn` selects and none of `exclude` does."""
  return _combine((fn, *exclude), lambda m: m[0] and not any(m[1:]))


def count(mask: Params) -> int:
  """Number of selected leaves."""
  return sum(bool(v) for v in _flat(mask).values())


def split(params: Params, mask: Params) -> tuple[Params, Params]:
  """Splits `params` into disjoint (selected, rest) nested dicts."""
  flat, flat_mask = _flat(params), _flat(mask)
  if flat.keys() != flat_mask.keys():
    raise ValueError(
      'mask structure does not match params: '
      f'{sorted(set(flat) ^ set(flat_mask))[:5]}'
    )
  selected = {k: v for k, v in flat.items() if flat_mask[k]}
  rest = {k: v for k, v in flat.items() if not flat_mask[k]}
  return _unflat(selected), _unflat(rest)


def merge(*trees: Params) -> Params:
  """Merges disjoint nested dicts; the exact inverse of `split`."""
  out: dict[tuple[str, ...], Any] = {}
  for tree in trees:
    flat = _flat(tree)
    overlap = out.keys() & flat.keys()
    if overlap:
      raise ValueError(f'merge of overlapping trees at {sorted(overlap)[:5]}')
    out.update(flat)
  return _unflat(out)


def selected_paths(params: Params, mask: Params) -> list[str]:
  """The '/'-joined paths that `mask` selects (for logging at start-up)."""
  return [_SEP.join(k) for k, v in _flat(mask).items() if v]


def split_by(
  mask_fn: MaskFn, params: Params, batch_stats: Params, *, who: str
) -> tuple[Params, Params]:
  """`split` with `mask_fn`, failing clearly when it selects nothing."""
  trainable, frozen = split(params, mask_fn(params, batch_stats))
  if not trainable:
    raise ValueError(
      f'{who}: the adapt mask selects no parameters of the model '
      f'(parameter paths: {paths(params)[:8]}...).'
    )
  return trainable, frozen
