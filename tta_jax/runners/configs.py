"""Reading an experiment config: which methods and trainers run, and how.

The only place where the runners turn `config.methods`,
`config.method_configs`, `config.meta_methods` and `config.meta_train` into
registered names and keyword arguments, so every runner and analysis binary
resolves them the same way.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from tta_jax import methods, trainers
from tta_jax.data import streams

PARALLEL = ('', 'domains', 'seeds')
# Keys of `config.method_configs.<name>` the runner reads (not the factory).
RUNNER_KEYS = ('method', 'meta_from')


def _names(text: str) -> list[str]:
  return [m.strip() for m in text.split(',') if m.strip()]


def resolve(config, name: str, registry: Mapping[str, Any]) -> str:
  """The entry of `registry` a (possibly variant) name uses.

  A name with its own entry uses it; a variant (`method_configs.<name>.
  method`, e.g. `norm_ema` of `norm`) uses its method's.
  """
  if name in registry:
    return name
  entry = config.method_configs.get(name)
  return entry.get('method', name) if entry is not None else name


def method_names(config) -> list[str]:
  """The requested methods, checked against the registry and the config."""
  names = _names(config.methods)
  valid = sorted(set(methods.METHODS) | set(config.method_configs))
  if not names:
    raise ValueError(f'config.methods is empty; valid: {valid}')
  unknown = [m for m in names if m not in valid]
  if unknown:
    raise ValueError(f'unknown methods {unknown}; valid: {valid}')
  missing = [m for m in names if m not in config.method_configs]
  if missing:
    raise ValueError(f'no config.method_configs entry for {missing}')
  for m in names:
    factory = resolve(config, m, methods.METHODS)
    if factory not in methods.METHODS:
      raise ValueError(
        f'method_configs.{m}.method={factory!r} is not a '
        f'registered method; valid: {sorted(methods.METHODS)}'
      )
  streams.parse_setting(config.setting)
  if config.parallel not in PARALLEL:
    raise ValueError(
      f'unknown config.parallel {config.parallel!r}; valid: {PARALLEL}'
    )
  if config.parallel == 'domains':
    base, _ = streams.parse_setting(config.setting)
    if base != 'reset_each_shift':
      raise ValueError(
        "config.parallel='domains' runs the domains as "
        'independent streams, which only the reset_each_shift '
        f'settings define (got {config.setting!r})'
      )
  return names


def method_kwargs(config, name: str) -> dict[str, Any]:
  """The factory's keyword arguments of a method (`from_config`'s config)."""
  kwargs = config.method_configs[name].to_dict()
  for key in RUNNER_KEYS:
    kwargs.pop(key, None)
  return kwargs


def trained_names(config) -> list[str]:
  """`config.meta_methods`: the methods whose trainers run first."""
  names = _names(config.meta_methods)
  registry = trainers.TRAINERS
  unknown = [m for m in names if resolve(config, m, registry) not in registry]
  if unknown:
    raise ValueError(
      f'no meta-trainer for {unknown}; valid: {sorted(registry)} (or '
      'method_configs variants of them)'
    )
  missing = [m for m in names if m not in config.meta_train]
  if missing:
    raise ValueError(f'no config.meta_train entry for {missing}')
  return names


def artifacts_owner(config, name: str) -> str | None:
  """Whose trained artifacts a method uses, or None (the source model).

  A method in `config.meta_methods` uses its own; `method_configs.<name>.
  meta_from` names another's (e.g. Tent on Meta-TTT's meta-trained
  backbone, or Meta-TTT without its test-time steps).
  """
  meta_from = config.method_configs[name].get('meta_from')
  if meta_from:
    return meta_from
  return name if name in trained_names(config) else None


def seeds_of(config) -> list[int]:
  return [int(s) for s in str(config.seeds).split(',') if s.strip()]


def jsonable(x):
  """`x` (ConfigDicts, tuples, numpy scalars inside) as plain JSON data."""
  if hasattr(x, 'to_dict'):
    x = x.to_dict()
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  return x
