"""Benchmarks: what a config's `data` section turns into.

A `Benchmark` holds the target domains in stream order and, where the
benchmark has them, the source splits (to pretrain the source model, to give
methods such as EATA clean source examples, and to measure forgetting on the
clean test split).
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from tta_jax.data import sources, streams
from tta_jax.data.images import digits


class Benchmark(NamedTuple):
  name: str
  domains: list[sources.Domain]  # target domains, in stream order
  input_shape: tuple[int, int, int]
  num_classes: int
  source_train: sources.Source | None = None
  source_val: sources.Source | None = None
  clean_test: sources.Source | None = None  # for the forgetting check
  # The classes (of the model's K) a benchmark scores, e.g. ImageNet-R's
  # 200: the runner restricts the logits to them and labels index them.
  class_subset: np.ndarray | None = None
  # Labelled source domains kept apart (meta-learning splits them into
  # meta-source / meta-target); one 'source' domain for single-source data.
  source_domains: list[sources.Domain] | None = None
  source_val_domains: list[sources.Domain] | None = None

  def meta_source_domains(self):
    """(train domains, val domains) for meta-training."""
    if self.source_domains is not None:
      return self.source_domains, self.source_val_domains
    if self.source_train is None:
      raise ValueError(f'benchmark {self.name!r} has no labelled source data')
    val = (
      [sources.Domain('source', self.source_val)]
      if self.source_val is not None
      else []
    )
    return [sources.Domain('source', self.source_train)], val


class DGDomain(NamedTuple):
  """A domain of a multi-source domain-generalisation dataset."""

  name: str
  train: sources.Source
  val: sources.Source
  test: sources.Source


def leave_one_out(
  name: str,
  dg_domains: Sequence[DGDomain],
  target: str,
  input_shape,
  num_classes: int,
) -> Benchmark:
  """The benchmark with `target` held out and every other domain as source.

  The held-out domain is evaluated on all its examples (DomainBed's
  protocol); the source domains' train parts train the model, their val
  parts select it, their test parts measure forgetting.
  """
  names = [d.name for d in dg_domains]
  if target not in names:
    raise ValueError(f'unknown held-out domain {target!r}; valid: {names}')
  held = dg_domains[names.index(target)]
  others = [d for d in dg_domains if d.name != target]
  # Full-scale datasets have two parts per domain (val is test): once each.
  parts = [held.train, held.val]
  if held.test is not held.val:
    parts.append(held.test)
  test = sources.ConcatSource(parts)
  return Benchmark(
    name=f'{name}:{target}',
    domains=[
      sources.in_memory(sources.Domain(target, test, {'held_out': target}))
    ],
    input_shape=tuple(input_shape),
    num_classes=num_classes,
    source_train=sources.ConcatSource([d.train for d in others]),
    source_val=sources.ConcatSource([d.val for d in others]),
    clean_test=sources.ConcatSource([d.test for d in others]),
    source_domains=[sources.Domain(d.name, d.train) for d in others],
    source_val_domains=[sources.Domain(d.name, d.val) for d in others],
  )


def _split(source, fractions, seed):
  n = len(source)
  order = np.random.default_rng(seed).permutation(n)
  cuts = (np.cumsum(fractions)[:-1] * n).astype(int)
  return [sources.SubsetSource(source, part) for part in np.split(order, cuts)]


def _digits_dg(cfg, shift_fns: dict) -> list[DGDomain]:
  """All 5,000 MNIST digits cut into disjoint per-domain chunks (DomainBed
  gives each Rotated-MNIST domain its own digits), each shifted and split
  80/10/10 into train/val/test."""
  splits = digits.load(seed=cfg.split_seed)
  everything = sources.materialize(
    sources.ConcatSource([splits.train, splits.val, splits.test])
  )
  order = np.random.default_rng(cfg.split_seed).permutation(
    len(everything['label'])
  )
  chunks = np.array_split(order, len(shift_fns))
  out = []
  for i, ((name, fn), chunk) in enumerate(
    zip(shift_fns.items(), chunks, strict=True)
  ):
    base = sources.ArraySource(
      everything['image'][chunk], everything['label'][chunk]
    )
    shifted = sources.in_memory(sources.Domain(name, fn(base))).source
    train, val, test = _split(shifted, (0.8, 0.1, 0.1), cfg.split_seed + i)
    out.append(DGDomain(name, train, val, test))
  return out


def _digits_rotated_dg(cfg) -> list[DGDomain]:
  c = _corruptions()
  return _digits_dg(
    cfg,
    {
      f'rot{deg}': (lambda s, d=deg: c.rotated_source(s, d))
      for deg in cfg.rotations
    },
  )


def _digits_corrupted_dg(cfg) -> list[DGDomain]:
  c = _corruptions()
  fns = {}
  for name in cfg.dg_domains:
    if name == 'clean':
      fns[name] = lambda s: s
    elif name in c.CORRUPTIONS:
      fns[name] = lambda s, n=name: c.corrupted_source(
        s, n, cfg.severity, cfg.corruption_seed
      )
    else:
      raise ValueError(
        f'unknown DG domain {name!r}; valid: clean, {list(c.CORRUPTIONS)}'
      )
  return _digits_dg(cfg, fns)


def _full_scale_dg(cfg) -> list[DGDomain]:
  """DomainBed-style image folders (PACS, VLCS, Office-Home, ...): each
  domain's 80 % trains, 20 % selects (and measures forgetting)."""
  from tta_jax.data.images import full_scale

  kwargs = dict(cfg.loader_kwargs)
  train = full_scale.load_domains(cfg.name, split='train', **kwargs)
  hold = full_scale.load_domains(cfg.name, split='holdout', **kwargs)
  return [
    DGDomain(t.name, t.source, h.source, h.source)
    for t, h in zip(train, hold, strict=True)
  ]


def _domainnet_dg(cfg) -> list[DGDomain]:
  """DomainNet from TFDS: each domain's train split trains, its test split
  selects (and measures forgetting)."""
  from tta_jax.data.images import full_scale

  kwargs = dict(cfg.loader_kwargs)
  train = full_scale.domainnet(split='train', **kwargs)
  test = full_scale.domainnet(split='test', **kwargs)
  return [
    DGDomain(t.name, t.source, h.source, h.source)
    for t, h in zip(train, test, strict=True)
  ]


DG_BENCHMARKS = {
  'digits_rotated_dg': _digits_rotated_dg,
  'digits_corrupted_dg': _digits_corrupted_dg,
  'pacs': _full_scale_dg,
  'vlcs': _full_scale_dg,
  'office_home': _full_scale_dg,
  'terra_incognita': _full_scale_dg,
  'domainnet': _domainnet_dg,
}


def targets(data_config, setting: str) -> list[tuple[str | None, Benchmark]]:
  """The benchmark(s) a config runs: `[(None, benchmark)]` for single-source
  TTA, or one `(held_out, benchmark)` per held-out domain for the
  leave-one-domain-out benchmarks (`data.held_out`: 'all' or names)."""
  name = data_config['name']
  if name not in DG_BENCHMARKS:
    return [(None, build(data_config, setting))]
  _check_target_split(data_config)
  dg_domains = DG_BENCHMARKS[name](data_config)
  names = [d.name for d in dg_domains]
  held = (
    names
    if data_config.held_out == 'all'
    else [h.strip() for h in data_config.held_out.split(',')]
  )
  shape = tuple(dg_domains[0].train[np.arange(1)]['image'].shape[1:])
  return [
    (t, leave_one_out(name, dg_domains, t, shape, data_config.num_classes))
    for t in held
  ]


def _corruptions():
  from tta_jax.data.images import corruptions  # heavy (jax) import, lazily

  return corruptions


def _digits_corrupted(cfg, setting) -> Benchmark:
  splits = digits.load(
    train=cfg.train_size,
    val=cfg.val_size,
    test=cfg.test_size,
    seed=cfg.split_seed,
  )
  c = _corruptions()
  names = list(cfg.corruptions)
  unknown = sorted(set(names) - set(c.ALL_CORRUPTIONS))
  if unknown:
    raise ValueError(
      f'unknown corruptions {unknown}; valid: {list(c.ALL_CORRUPTIONS)}'
    )
  # 'val': corrupt the source-val digits instead of the test digits, a
  # validation stream for selecting hyperparameters (with
  # VALIDATION_CORRUPTIONS: disjoint from the test stream's images and
  # corruptions alike).
  split = cfg.get('target_split', 'test')
  if split not in ('test', 'val'):
    raise ValueError(f"data.target_split must be 'test' or 'val': {split!r}")
  if split == 'val' and cfg.natural_shift:
    raise ValueError(
      'data.natural_shift adds the UCI test digits: set it False with '
      "data.target_split='val'"
    )
  target = splits.test if split == 'test' else splits.val
  base, _ = streams.parse_setting(setting)
  severities = (
    streams.GRADUAL_SEVERITIES if base == 'gradual' else (cfg.severity,)
  )
  domains = []
  for name in names:
    for sev in severities:
      label = name if len(severities) == 1 else f'{name}@{sev}'
      domains.append(
        sources.Domain(
          label,
          c.corrupted_source(target, name, sev, cfg.corruption_seed),
          {'corruption': name, 'severity': sev},
        )
      )
  if cfg.natural_shift:
    domains.append(
      sources.Domain('uci_digits', splits.uci, {'natural_shift': 'uci_digits'})
    )
  if cfg.max_examples_per_domain:
    domains = [_subset(d, cfg.max_examples_per_domain) for d in domains]
  # Small: generate every shifted image once, not once per method.
  domains = [sources.in_memory(d) for d in domains]
  return Benchmark(
    'digits_corrupted',
    domains,
    digits.IMAGE_SHAPE,
    digits.NUM_CLASSES,
    splits.train,
    splits.val,
    splits.test,
  )


def _no_severities(name: str, setting: str) -> None:
  """Refuses `gradual` on a benchmark whose domains have no severities."""
  if streams.parse_setting(setting)[0] == 'gradual':
    raise ValueError(
      f"setting 'gradual' needs corruption severities, which {name!r} does "
      'not have; use continual'
    )


def _digits_rotated(cfg, setting) -> Benchmark:
  _no_severities('digits_rotated', setting)
  splits = digits.load(
    train=cfg.train_size,
    val=cfg.val_size,
    test=cfg.test_size,
    seed=cfg.split_seed,
  )
  c = _corruptions()
  domains = [
    sources.Domain(
      f'rot{deg}', c.rotated_source(splits.test, deg), {'rotation': deg}
    )
    for deg in cfg.rotations
  ]
  if cfg.max_examples_per_domain:
    domains = [_subset(d, cfg.max_examples_per_domain) for d in domains]
  domains = [sources.in_memory(d) for d in domains]
  return Benchmark(
    'digits_rotated',
    domains,
    digits.IMAGE_SHAPE,
    digits.NUM_CLASSES,
    splits.train,
    splits.val,
    splits.test,
  )


def _subset(domain: sources.Domain, n: int) -> sources.Domain:
  """The first n examples of a domain (a fixed, seeded stratification is
  already in the split)."""
  n = min(n, len(domain))
  src = domain.source
  idx = np.arange(n)

  class _Head:
    def __len__(self):
      return n

    def __getitem__(self, indices):
      return src[idx[np.asarray(indices)]]

    @property
    def labels(self):
      read = getattr(src, 'read_labels', None)
      if read is not None:
        return read(idx)
      labels = getattr(src, 'labels', None)
      return None if labels is None else np.asarray(labels)[:n]

  return sources.Domain(domain.name, _Head(), domain.info)


def _full_scale(cfg, setting) -> Benchmark:
  from tta_jax.data.images import full_scale

  kwargs = dict(cfg.loader_kwargs)
  base, _ = streams.parse_setting(setting)
  if base == 'gradual':
    if 'severities' not in _params(full_scale, cfg.name):
      _no_severities(cfg.name, setting)
    kwargs['severities'] = streams.GRADUAL_SEVERITIES
  domains = full_scale.load_domains(cfg.name, **kwargs)
  if not domains:
    raise ValueError(f'dataset {cfg.name!r} gave no domains')
  if cfg.max_examples_per_domain:
    domains = [_subset(d, cfg.max_examples_per_domain) for d in domains]
  subsets = {
    tuple(np.asarray(d.info['class_subset']).tolist())
    for d in domains
    if 'class_subset' in d.info
  }
  if len(subsets) > 1:
    raise ValueError(f'{cfg.name}: domains score different class subsets')
  subset = np.asarray(subsets.pop(), np.int32) if subsets else None
  if subset is not None:
    domains = [_relabel(d, subset) for d in domains]
  shape = tuple(domains[0].source[np.arange(1)]['image'].shape[1:])
  clean = None
  if cfg.clean_name:
    clean = _one_source(full_scale, cfg.clean_name, cfg.clean_kwargs)
  # The labelled source split (meta-training reads it), e.g. CIFAR's train.
  train = None
  if cfg.get('source_train_name'):
    train = _one_source(
      full_scale, cfg.source_train_name, cfg.get('source_train_kwargs', {})
    )
  return Benchmark(
    cfg.name,
    domains,
    shape,
    cfg.num_classes,
    source_train=train,
    source_val=clean,
    clean_test=clean,
    class_subset=subset,
  )


def _one_source(full_scale, name: str, kwargs) -> sources.Source:
  (domain, *rest) = full_scale.load_domains(name, **dict(kwargs))
  if rest:
    raise ValueError(f'{name!r} gave {len(rest) + 1} domains, expected one')
  return domain.source


def _relabel(domain: sources.Domain, subset: np.ndarray) -> sources.Domain:
  """Labels in the model's K classes -> positions in `subset`."""

  def fn(batch, indices):
    del indices
    pos = np.searchsorted(subset, batch['label'])
    if np.any(subset[np.minimum(pos, len(subset) - 1)] != batch['label']):
      raise ValueError(f'{domain.name}: a label is outside the class subset')
    return dict(batch, label=pos.astype(np.int32))

  return sources.Domain(
    domain.name, sources.MappedSource(domain.source, fn), domain.info
  )


def _params(module, name) -> Sequence[str]:
  import inspect

  fn = getattr(module, 'LOADERS', {}).get(name)
  return list(inspect.signature(fn).parameters) if fn else []


BENCHMARKS = {
  'digits_corrupted': _digits_corrupted,
  'digits_rotated': _digits_rotated,
}


def target_tags(data_config) -> list[str | None] | None:
  """The tags `targets` would return, without loading any data: `[None]`
  for single-source benchmarks, the held-out domains of the embedded
  leave-one-domain-out ones; None where that needs the data."""
  name = data_config['name']
  if name not in DG_BENCHMARKS:
    return [None]
  if data_config.held_out != 'all':
    return [h.strip() for h in data_config.held_out.split(',')]
  if name == 'digits_rotated_dg':
    return [f'rot{d}' for d in data_config.rotations]
  if name == 'digits_corrupted_dg':
    return list(data_config.dg_domains)
  return None


def check_data_config(data_config) -> None:
  """What can be checked of a data config without loading any data.

  The dataset name, and for the embedded digits the corruption names,
  severity, split sizes and the held-out domains; raises ValueError naming
  the problem.
  """
  name = data_config['name']
  from tta_jax.data.images import full_scale

  loaders = getattr(full_scale, 'LOADERS', {})
  if (
    name not in BENCHMARKS and name not in DG_BENCHMARKS and name not in loaders
  ):
    valid = sorted(BENCHMARKS) + sorted(DG_BENCHMARKS) + sorted(loaders)
    raise ValueError(f'unknown dataset {name!r}; valid: {valid}')
  _check_target_split(data_config)
  if data_config.get('max_examples_per_domain', 0) < 0:
    raise ValueError('data.max_examples_per_domain must be >= 0')
  if not name.startswith('digits'):
    return
  for key in ('train_size', 'val_size', 'test_size'):
    if not isinstance(data_config[key], int) or data_config[key] < 1:
      raise ValueError(f'data.{key} must be a positive integer')
  c = _corruptions()
  if name == 'digits_corrupted':
    unknown = sorted(set(data_config.corruptions) - set(c.ALL_CORRUPTIONS))
    if unknown:
      raise ValueError(
        f'unknown corruptions {unknown}; valid: {list(c.ALL_CORRUPTIONS)}'
      )
    if data_config.severity not in c.CORRUPTION_SEVERITIES:
      raise ValueError(
        f'data.severity must be one of {list(c.CORRUPTION_SEVERITIES)}, '
        f'got {data_config.severity!r}'
      )
  if name in DG_BENCHMARKS and data_config.held_out != 'all':
    known = (
      [f'rot{d}' for d in data_config.rotations]
      if name == 'digits_rotated_dg'
      else list(data_config.dg_domains)
    )
    held = [h.strip() for h in data_config.held_out.split(',')]
    unknown = [h for h in held if h not in known]
    if unknown:
      raise ValueError(
        f'data.held_out: unknown domains {unknown}; valid: {known}'
      )


def use_validation_shifts(data_config) -> None:
  """Turns a corrupted-digits data config into its validation stream.

  The four held-out corruptions of Hendrycks & Dietterich
  (`corruptions.VALIDATION_CORRUPTIONS`, severity 5) applied to the
  source-val digits: neither the test digits nor the 15 test corruptions
  (nor the UCI digits) are seen, so hyperparameters selected on it (and
  trainers that learn from shifted data) never see the test stream.
  """
  if data_config['name'] != 'digits_corrupted':
    raise ValueError(
      f'a validation stream is defined for digits_corrupted only, not '
      f'{data_config["name"]!r}'
    )
  data_config.corruptions = _corruptions().VALIDATION_CORRUPTIONS
  data_config.severity = 5
  data_config.target_split = 'val'
  data_config.natural_shift = False


def has_shifted_domains(data_config) -> bool:
  """Whether `shifted_domains` has labelled shifts disjoint from the test
  stream for this benchmark."""
  name = data_config['name']
  if name == 'digits_corrupted':
    return True
  from tta_jax.data.images import full_scale

  return name in full_scale.LOADERS and 'corruptions' in _params(
    full_scale, name
  )


def shifted_domains(data_config) -> list[sources.Domain]:
  """Labelled shifts disjoint from the test stream, for selection and for
  trainers that learn from shifted data.

  The corrupted digits: the validation stream (`use_validation_shifts`).
  The full-scale corruption datasets (CIFAR-10-C, ImageNet-C, in every
  layout): the four extra corruptions released beside the 15
  (speckle_noise, gaussian_blur, spatter, saturate), read by the same loader
  from the same data at the configured severity. Raises ValueError where
  the benchmark has none (`has_shifted_domains`).
  """
  name = data_config['name']
  if name == 'digits_corrupted':
    return validation_domains(data_config)
  if not has_shifted_domains(data_config):
    raise ValueError(
      f'{name!r} has no shifted domains disjoint from its test stream; '
      'corruption benchmarks do (digits_corrupted, CIFAR-10-C, ImageNet-C)'
    )
  from tta_jax.data.images import full_scale

  kwargs = dict(data_config.get('loader_kwargs', {}))
  kwargs.pop('severities', None)
  kwargs['corruptions'] = list(full_scale.EXTRA_CORRUPTIONS)
  return full_scale.load_domains(name, **kwargs)


def validation_domains(data_config) -> list[sources.Domain]:
  """The corrupted digits' validation stream (`use_validation_shifts`)."""
  config = data_config.copy_and_resolve_references()
  use_validation_shifts(config)
  return build(config, 'continual').domains


def _check_target_split(data_config) -> None:
  """`data.target_split='val'` (a validation stream) exists for the
  corrupted digits only; elsewhere it is refused, not ignored."""
  split = data_config.get('target_split', 'test')
  if split != 'test' and data_config['name'] != 'digits_corrupted':
    raise ValueError(
      f'data.target_split={split!r} is only supported by digits_corrupted, '
      f'not {data_config["name"]!r}'
    )


def build(data_config: Mapping[str, Any], setting: str) -> Benchmark:
  """Builds the benchmark named `data_config.name` for a stream setting."""
  name = data_config['name']
  _check_target_split(data_config)
  if name in BENCHMARKS:
    return BENCHMARKS[name](data_config, setting)
  from tta_jax.data.images import full_scale

  if name in getattr(full_scale, 'LOADERS', {}):
    return _full_scale(data_config, setting)
  valid = (
    sorted(BENCHMARKS)
    + sorted(DG_BENCHMARKS)
    + sorted(getattr(full_scale, 'LOADERS', {}))
  )
  raise ValueError(f'unknown dataset {name!r}; valid: {valid}')
