"""Reading an experiment config: which methods and trainers run, and how.

The only place where the runners turn `config.methods`,
`config.method_configs`, `config.meta_methods` and `config.meta_train` into
registered names and keyword arguments, so every runner and analysis binary
resolves them the same way.
"""

import inspect
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from tta_jax import methods, models, trainers
from tta_jax.data import benchmarks, streams

PARALLEL = ('', 'domains', 'seeds')
# Keys of `config.method_configs.<name>` the runner reads (not the factory).
RUNNER_KEYS = ('method', 'meta_from', 'model')


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


def trained_names(
  config, registry=trainers.TRAINERS, kind: str = 'meta-trainer'
) -> list[str]:
  """`config.meta_methods`: the methods whose trainers (of `registry`, each
  a `kind`) run first; their `config.meta_train` entries are checked."""
  names = _names(config.meta_methods)
  unknown = [m for m in names if resolve(config, m, registry) not in registry]
  if unknown:
    raise ValueError(
      f'no {kind} for {unknown}; valid: {sorted(registry)} (or '
      'method_configs variants of them)'
    )
  missing = [m for m in names if m not in config.meta_train]
  if missing:
    raise ValueError(f'no config.meta_train entry for {missing}')
  for m in names:
    trainers.check_settings(resolve(config, m, registry), config.meta_train[m])
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


def model_config(config, name: str) -> dict[str, Any]:
  """The model method `name` runs on: `config.model`, updated by its
  `method_configs.<name>.model` (e.g. the dual encoder with the prompt
  ensemble instead of the context, on the same trained weights)."""
  out = config.model.to_dict()
  override = config.method_configs[name].get('model')
  if override:
    override = dict(override)
    if 'name' in override and override['name'] != out['name']:
      raise ValueError(
        f'method_configs.{name}.model may change model settings, not the '
        f'model ({override["name"]!r} vs {out["name"]!r})'
      )
    out.update(override)
  return out


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


# ----------------------------------------------------------------------------
# Checking a config before any work.


def _number(config, path: str, *, low=None, integer=False, allow_zero=True):
  value = config
  for key in path.split('.'):
    value = value[key]
  kind = int if integer else (int, float)
  if isinstance(value, bool) or not isinstance(value, kind):
    raise TypeError(
      f'config.{path} must be {"an integer" if integer else "a number"}, '
      f'got {value!r}'
    )
  if low is not None and (value < low or (not allow_zero and value == 0)):
    bound = f'> {low}' if not allow_zero else f'>= {low}'
    raise ValueError(f'config.{path} must be {bound}, got {value}')


def _check_optimizer(name: str, spec) -> None:
  lr = spec.get('learning_rate')
  if lr is not None and (isinstance(lr, bool) or not lr >= 0):
    raise ValueError(
      f'method_configs.{name}.optimizer.learning_rate must be >= 0, got {lr}'
    )


def _normalises_with_test_batch(config, name: str) -> bool:
  """Methods whose BN statistics come from the test batch: those with the
  `mixed_bn_alpha` option (it replaces them) and `norm` without a prior."""
  factory = methods.METHODS[resolve(config, name, methods.METHODS)]
  if 'mixed_bn_alpha' in inspect.signature(factory).parameters:
    return config.method_configs[name].get('mixed_bn_alpha') is None
  kwargs = method_kwargs(config, name)
  return factory is methods.METHODS['norm'] and not (
    kwargs.get('source_weight') or kwargs.get('prior_strength')
  )


def check(config) -> list[str]:
  """Everything about a config that can be checked before any work.

  Names (methods, trainers, setting, parallel mode, model, dataset),
  types and ranges (batch size, seeds, severity, intervals, learning
  rates), and every requested method built from its keyword arguments
  (unknown keys and bad values fail here, not after the source model has
  been trained). Returns the method names; raises ValueError or TypeError
  naming the problem.
  """
  names = method_names(config)
  trained_names(config)
  _number(config, 'batch_size', low=0, integer=True, allow_zero=False)
  seeds = str(config.seeds)
  if not all(s.strip().lstrip('-').isdigit() for s in seeds.split(',')):
    raise ValueError(f'config.seeds must be comma-separated integers: {seeds}')
  for path in ('checkpoint_every', 'log_every', 'clean_eval_examples'):
    _number(config, path, low=0, integer=True)
  _number(config, 'num_source_images', low=0, integer=True)
  if config.nonfinite not in ('skip', 'raise'):
    raise ValueError(
      f"config.nonfinite must be 'skip' or 'raise', got {config.nonfinite!r}"
    )
  if config.model.name not in models.MODELS:
    raise ValueError(
      f'unknown model {config.model.name!r}; valid: {sorted(models.MODELS)}'
    )
  benchmarks.check_data_config(config.data)
  for path in ('epochs', 'steps', 'batch_size'):  # epoch- or step-counted
    if path in config.pretrain:
      _number(config, f'pretrain.{path}', low=0, integer=True)
  _number(config, 'pretrain.learning_rate', low=0)
  context = {
    'source_images': np.zeros((1, 1, 1, 1), np.float32),
    'input_shape': (1, 1, 1),
    'num_classes': 2,
  }
  for name in names:
    kwargs = method_kwargs(config, name)
    if isinstance(kwargs.get('optimizer'), Mapping):
      _check_optimizer(name, kwargs['optimizer'])
    try:
      methods.from_config(
        resolve(config, name, methods.METHODS),
        kwargs,
        lambda *a, **k: None,
        **context,
      )
    except (ValueError, TypeError) as e:
      raise type(e)(f'method {name!r}: {e}') from None
  _check_stream_sharding(config)
  if config.batch_size == 1:
    batch_bn = [n for n in names if _normalises_with_test_batch(config, n)]
    if batch_bn:
      logging.warning(
        'batch_size=1: %s normalise with the test batch, whose statistics '
        'are those of one example (their errors will be near chance); '
        'use a larger batch, or mixed_bn_alpha / norm.prior_strength',
        batch_bn,
      )
  return names


def _check_stream_sharding(config) -> None:
  """Sharded streams (`config.shard_streams`, or several processes) need
  vmapped streams, as many as a multiple of the devices."""
  processes = jax.process_count()
  if not config.get('shard_streams', False) and processes == 1:
    return
  devices = jax.device_count()
  what = (
    f'a run of {processes} processes shards its streams'
    if processes > 1
    else 'config.shard_streams shards the streams'
  )
  if config.get('shard_batch', False):
    raise ValueError(f'{what}: config.shard_batch must be False')
  seeds = seeds_of(config)
  if devices > 1 and (
    config.parallel == '' or (config.parallel == 'seeds' and len(seeds) == 1)
  ):
    raise ValueError(
      f"{what} over {devices} devices: set config.parallel='seeds' (with a "
      f"multiple of {devices} seeds) or 'domains'"
    )
  if config.parallel == 'seeds' and len(seeds) % devices:
    raise ValueError(
      f'{what} over {devices} devices: config.seeds has {len(seeds)} seeds, '
      f'not a multiple of {devices}'
    )


# What the runner reads from an adaptation config (`--dry_run` prints it
# beside every key's value).
KEY_HELP = {
  'seed': 'model initialisation and method random keys',
  'seeds': "stream-order seeds, comma-separated ('0,1,2'); results average",
  'methods': 'comma-separated methods run side by side (METHODS or variants)',
  'setting': 'continual, reset_each_shift, gradual, mixed_domains, '
  'correlated_* (see tta_jax.data.streams)',
  'batch_size': 'test batch size',
  'dirichlet_delta': 'label correlation of the correlated settings',
  'num_source_images': 'clean source images given to methods (EATA Fisher)',
  'clean_eval_examples': 'clean test examples for the forgetting check',
  'parallel': "'' sequential, 'domains' or 'seeds': vmapped streams",
  'shard_batch': 'shard every batch over all devices',
  'shard_streams': 'shard the vmapped streams over all devices (on with '
  'several processes)',
  'nonfinite': "'skip' masks NaN/Inf rows out and scores them as errors; "
  "'raise' stops the run",
  'meta_methods': 'methods whose trainers meta_train_main runs',
  'results_name': 'WORKDIR/<results_name>.{json,md,csv,png}',
  'checkpoint_every': 'batches between stream checkpoints (0: none)',
  'log_every': "batches between trainers' progress lines",
  'progress_seconds': 'seconds between progress lines of a stream',
  'tensorboard': 'write per-batch metrics to WORKDIR/tensorboard',
  'source_ckpt': "a source model folder; '' trains one in WORKDIR/source",
  'data.name': 'the benchmark (tta_jax.data.benchmarks)',
  'data.corruptions': 'the corruption domains, in stream order',
  'data.severity': 'corruption severity, 1 to 5',
  'data.natural_shift': 'append the UCI digits as a natural-shift domain',
  'data.target_split': "'test', or 'val' for a validation stream",
  'data.max_examples_per_domain': 'cap per domain (0: all)',
  'data.held_out': "leave-one-domain-out: 'all' or held-out domain names",
  'model.name': 'the model (tta_jax.models.MODELS)',
  'pretrain.epochs': 'source training epochs',
  'pretrain.batch_size': 'source training batch size',
  'pretrain.learning_rate': 'source training AdamW learning rate (cosine)',
  'pretrain.init_ckpt': 'warm-start source training from this checkpoint',
}
