"""Test streams: the evaluation protocols of the online TTA benchmarks.

The settings of mariodoebler/test-time-adaptation, each a deterministic plan
of fixed-shape batches over a list of `Domain`s:

- `reset_each_shift`: one domain at a time, the model reset before each.
- `continual`: the domains in sequence, never reset.
- `gradual`: like continual; the runner builds the domain list with the
  severities 1, 2, 3, 4, 5, 4, 3, 2, 1 of every corruption
  (`gradual_severities`).
- `mixed_domains`: all domains' examples shuffled into one stream.
- `<setting>_correlated` (and plain `correlated` = `continual_correlated`):
  within each run, examples are ordered by label (`dirichlet_delta=0`) or by
  NOTE's Dirichlet scheme (`dirichlet_delta > 0`; smaller is more
  correlated), a non-i.i.d. label shift.

A stream never mixes two runs in one batch: the last batch of a run is
padded to the batch size (repeating its first example) with `mask` False on
the padding rows, so every batch has the same shape and one compiled step
serves the whole stream. Batch size 1 is a stream like any other. Only
indices are planned here; pixels are read from the domains' sources batch by
batch, so large datasets are never loaded whole.
"""

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from tta_jax.data import sources

BASE_SETTINGS = ('reset_each_shift', 'continual', 'gradual', 'mixed_domains')
SETTINGS = (
  *BASE_SETTINGS,
  'correlated',
  *(f'{s}_correlated' for s in BASE_SETTINGS),
)
GRADUAL_SEVERITIES = (1, 2, 3, 4, 5, 4, 3, 2, 1)


class Run(NamedTuple):
  """A stretch of stream fed without interruption."""

  reset: bool  # reset the adaptation state before this run
  domain: np.ndarray  # int [n] index into the domain list, per example
  index: np.ndarray  # int [n] example index within its domain


class StreamBatch(NamedTuple):
  batch: dict[str, np.ndarray]  # image, label, mask [B] bool, domain [B] int
  reset: bool  # reset the adaptation state before this batch
  index: int  # position of the batch in the stream


class Plan(NamedTuple):
  runs: list[Run]
  batch_size: int
  domain_names: list[str]

  @property
  def num_batches(self) -> int:
    return sum(-(-len(r.index) // self.batch_size) for r in self.runs)

  @property
  def num_examples(self) -> int:
    return sum(len(r.index) for r in self.runs)


def parse_setting(setting: str) -> tuple[str, bool]:
  """`'gradual_correlated'` -> `('gradual', True)`; validates the name."""
  if setting not in SETTINGS:
    raise ValueError(f'unknown stream setting {setting!r}; valid: {SETTINGS}')
  if setting == 'correlated':
    return 'continual', True
  if setting.endswith('_correlated'):
    return setting[: -len('_correlated')], True
  return setting, False


def dirichlet_order(
  labels: np.ndarray,
  delta: float,
  rng: np.random.Generator,
  *,
  min_chunk: int = 10,
  max_tries: int = 1000,
) -> np.ndarray:
  """NOTE's temporally correlated order (Gong et al. 2022).

  The stream is cut into as many chunks as classes; each class spreads its
  examples over the chunks with Dirichlet(delta) proportions (chunks already
  holding their share are skipped); each chunk lists its classes in random
  order, each class contiguous. Resampled until every chunk has at least
  `min_chunk` examples (capped by the data size).

  Returns:
    A permutation of `range(len(labels))`.
  """
  n = len(labels)
  classes = np.unique(labels)
  k = len(classes)
  min_chunk = min(min_chunk, n // max(k, 1))
  for _ in range(max_tries):
    chunks = [[] for _ in range(k)]
    for c in classes:
      idx = rng.permutation(np.flatnonzero(labels == c))
      p = rng.dirichlet(np.full(k, delta))
      sizes = np.array([sum(len(a) for a in ch) for ch in chunks])
      p = p * (sizes < n / k)
      p = p / p.sum() if p.sum() > 0 else np.full(k, 1.0 / k)
      cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
      for chunk, part in zip(chunks, np.split(idx, cuts), strict=True):
        chunk.append(part)
    if min(sum(len(a) for a in ch) for ch in chunks) >= min_chunk:
      break
  else:
    raise ValueError(
      f'could not build a Dirichlet({delta}) order with chunks of at least '
      f'{min_chunk} examples; try another dirichlet_delta'
    )
  order = []
  for chunk in chunks:
    for j in rng.permutation(k):
      order.append(chunk[j])
  return np.concatenate(order)


def _order(labels, *, correlated, delta, rng):
  if not correlated:
    return rng.permutation(len(labels))
  if delta > 0:
    return dirichlet_order(labels, delta, rng)
  perm = rng.permutation(len(labels))  # random order within each class
  return perm[np.argsort(labels[perm], kind='stable')]


def _labels(domain: sources.Domain) -> np.ndarray:
  labels = getattr(domain.source, 'labels', None)
  if labels is None:
    labels = domain.source[np.arange(len(domain))]['label']
  return np.asarray(labels)


def plan(
  setting: str,
  domains: Sequence[sources.Domain],
  *,
  batch_size: int,
  seed: int = 0,
  dirichlet_delta: float = 0.0,
  shuffle: bool = True,
) -> Plan:
  """Plans a stream over `domains` (deterministic in `seed`).

  Args:
    setting: one of `SETTINGS`.
    domains: the test domains in stream order (for `gradual`, already
      expanded over `GRADUAL_SEVERITIES`).
    batch_size: B; the last batch of every run is padded.
    seed: order seed; the same seed gives the same stream for every method.
    dirichlet_delta: for correlated settings, 0 sorts by label.
    shuffle: shuffle within each run (i.i.d. settings); False keeps the
      sources' order.

  Returns:
    A `Plan`.
  """
  base, correlated = parse_setting(setting)
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  if not domains:
    raise ValueError('a stream needs at least one domain')
  for d in domains:
    if len(d) == 0:
      raise ValueError(f'domain {d.name!r} has no examples')
  rng = np.random.default_rng(seed)
  names = [d.name for d in domains]
  if base == 'mixed_domains':
    dom = np.concatenate([np.full(len(d), i) for i, d in enumerate(domains)])
    idx = np.concatenate([np.arange(len(d)) for d in domains])
    if correlated:
      labels = np.concatenate([_labels(d) for d in domains])
      order = _order(labels, correlated=True, delta=dirichlet_delta, rng=rng)
    else:
      order = rng.permutation(len(idx)) if shuffle else np.arange(len(idx))
    return Plan([Run(True, dom[order], idx[order])], batch_size, names)
  runs = []
  for i, d in enumerate(domains):
    if correlated:
      order = _order(
        _labels(d), correlated=True, delta=dirichlet_delta, rng=rng
      )
    else:
      order = rng.permutation(len(d)) if shuffle else np.arange(len(d))
    reset = base == 'reset_each_shift' or i == 0
    runs.append(Run(reset, np.full(len(d), i), order))
  return Plan(runs, batch_size, names)


def _pad(a: np.ndarray, size: int) -> np.ndarray:
  if len(a) == size:
    return a
  return np.concatenate([a, np.repeat(a[:1], size - len(a), axis=0)])


def batch_positions(
  plan_: Plan,
) -> list[tuple[bool, np.ndarray, np.ndarray, int]]:
  """Per batch: (reset, domain ids [n], indices [n], n valid)."""
  out = []
  b = plan_.batch_size
  for run in plan_.runs:
    for j, start in enumerate(range(0, len(run.index), b)):
      dom, idx = run.domain[start : start + b], run.index[start : start + b]
      out.append((run.reset and j == 0, dom, idx, len(idx)))
  return out


def read_batch(
  domains: Sequence[sources.Domain],
  dom: np.ndarray,
  idx: np.ndarray,
  batch_size: int,
) -> dict[str, np.ndarray]:
  """Reads and pads one planned batch."""
  n = len(idx)
  images = labels = None
  for d in np.unique(dom):
    rows = np.flatnonzero(dom == d)
    part = domains[int(d)].source[idx[rows]]
    if images is None:
      images = np.empty((n, *part['image'].shape[1:]), np.float32)
      labels = np.empty((n,), np.int32)
    images[rows] = part['image']
    labels[rows] = part['label']
  return {
    'image': _pad(images, batch_size),
    'label': _pad(labels, batch_size),
    'mask': np.arange(batch_size) < n,
    'domain': _pad(dom.astype(np.int32), batch_size),
  }


def iterate(
  plan_: Plan, domains: Sequence[sources.Domain], *, start: int = 0
) -> Iterator[StreamBatch]:
  """Yields the planned batches from batch `start` on (for resuming)."""
  if [d.name for d in domains] != plan_.domain_names:
    raise ValueError('the plan was made for other domains')
  for i, (reset, dom, idx, _) in enumerate(batch_positions(plan_)):
    if i < start:
      continue
    yield StreamBatch(read_batch(domains, dom, idx, plan_.batch_size), reset, i)
