"""The methods: an explicit registry of `Adapter` factories.

Every factory takes the model's `apply_fn` first, its optimizer second if it
has one, and everything else keyword-only. `from_config` is the only glue
between configs and factories: a method's config keys are exactly the
factory's keyword arguments, plus `optimizer` (an optax spec) and mask specs
for `adapt`-like arguments.
"""

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import optax

from tta_jax._src import base, params as params_lib
from tta_jax.methods import (
  cotta,
  deyo,
  eata,
  generalizeformer,
  lame,
  memo,
  meta_ttt,
  mgg,
  norm,
  rotta,
  sar,
  source,
  t3a,
  tent,
  tpt,
)

METHODS: dict[str, Callable[..., base.Adapter]] = {
  'source': source.source,
  'norm': norm.norm,
  'tent': tent.tent,
  'eata': eata.eata,
  'eta': eata.eta,
  'sar': sar.sar,
  'cotta': cotta.cotta,
  'memo': memo.memo,
  'lame': lame.lame,
  't3a': t3a.t3a,
  'rotta': rotta.rotta,
  'meta_ttt': meta_ttt.meta_ttt,
  'generalizeformer': generalizeformer.generalizeformer,
  'tpt': tpt.tpt,
  'mgg': mgg.mgg,
  'deyo': deyo.deyo,
}

# Factory arguments that take a parameter mask; configs give them as specs.
_MASK_ARGS = ('adapt',)


def make_optimizer(spec: Mapping[str, Any]) -> optax.GradientTransformation:
  """Builds `optax.<name>(**rest)`; `inject=True` wraps it for meta-learning.

  Example: `{'name': 'sgd', 'learning_rate': 2.5e-4, 'momentum': 0.9}`.
  """
  spec = dict(spec)
  name = spec.pop('name', None)
  inject = spec.pop('inject', False)
  factory = getattr(optax, name, None) if isinstance(name, str) else None
  if factory is None:
    raise ValueError(f'unknown optax optimizer {name!r} in {spec}')
  if inject:
    factory = optax.inject_hyperparams(factory)
  return factory(**spec)


def mask_from_spec(spec: str) -> params_lib.MaskFn:
  """Parses a parameter-selection spec into a mask function.

  A spec is comma-separated terms; a term starting with `!` is excluded.
  Terms: `bn_affine`, `all`, `classifier` (the module `head`),
  `head:<module>`, `re:<regex>` (matched against '/'-joined paths).
  Example: `'bn_affine,!re:^layer4'` (SAR on ResNet).
  """
  include, exclude = [], []
  for raw in (t.strip() for t in spec.split(',') if t.strip()):
    target = exclude if raw.startswith('!') else include
    term = raw.lstrip('!')
    if term == 'bn_affine':
      target.append(params_lib.bn_affine)
    elif term == 'all':
      target.append(params_lib.all_params)
    elif term == 'classifier':
      target.append(params_lib.classifier())
    elif term.startswith('head:'):
      target.append(params_lib.classifier(term[5:]))
    elif term.startswith('re:'):
      target.append(params_lib.by_regex(term[3:]))
    else:
      raise ValueError(
        f'unknown mask term {term!r} in {spec!r}; valid: bn_affine, all, '
        'classifier, head:<module>, re:<regex> (prefix ! to exclude)'
      )
  if not include:
    raise ValueError(f'mask spec {spec!r} includes nothing')
  fn = params_lib.union(*include)
  return params_lib.difference(fn, *exclude) if exclude else fn


def from_config(
  name: str, config: Mapping[str, Any], apply_fn, **context: Any
) -> base.Adapter:
  """Builds method `name` from its config dict.

  Args:
    name: a key of `METHODS`.
    config: the factory's keyword arguments, plus `optimizer` (an optax
      spec, see `make_optimizer`) and mask specs (see `mask_from_spec`).
    apply_fn: the model's `ApplyFn`.
    **context: things the runner knows (e.g. `source_data` for EATA's
      Fisher); passed to factories whose signature names them.

  Returns:
    The method's `Adapter`.
  """
  if name not in METHODS:
    raise ValueError(f'unknown method {name!r}; valid: {sorted(METHODS)}')
  factory = METHODS[name]
  signature = inspect.signature(factory)
  accepted = {
    p.name for p in signature.parameters.values() if p.kind == p.KEYWORD_ONLY
  }
  kwargs = dict(config)
  args = [apply_fn]
  if 'optimizer' in signature.parameters:
    if 'optimizer' not in kwargs:
      raise ValueError(f'method {name!r} needs an `optimizer` spec')
    args.append(make_optimizer(kwargs.pop('optimizer')))
  unknown = sorted(set(kwargs) - accepted)
  if unknown:
    raise ValueError(
      f'unknown config keys {unknown} for method {name!r}; valid: '
      f'{sorted(accepted | ({"optimizer"} & set(signature.parameters)))}'
    )
  for key in _MASK_ARGS:
    if isinstance(kwargs.get(key), str):
      kwargs[key] = mask_from_spec(kwargs[key])
  for key, value in context.items():
    if key in accepted and key not in kwargs:
      kwargs[key] = value
  return factory(*args, **kwargs)
