"""Scoring and aggregation: per-domain metrics, forgetting, held-out merges.

The per-example scores come from the stream loop (`runners.streams`); here
they become the per-domain, per-method numbers of `results.json`. Accuracy
on clean data (forgetting) uses the one routine the trainers also use,
`metrics.count_correct`.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from tta_jax._src import metrics
from tta_jax.data import sources
from tta_jax.runners import configs
from tta_jax.runners.streams import StreamResult


def clean_error(
  adapter,
  state,
  source: sources.Source,
  batch_size: int,
  *,
  meta=None,
  max_examples: int = 0,
) -> float:
  """Error of `state` on clean data, without carrying adaptation over.

  Every clean batch is predicted by `step(state, batch)` from the same
  `state`, so this measures the adapted model, not further adaptation.
  """
  pred = jax.jit(lambda s, x: adapter.step(s, x, meta=meta)[1].logits)
  correct, total = metrics.count_correct(
    lambda s, x: (s, pred(s, x)),
    state,
    sources.padded_batches(source, batch_size, limit=max_examples),
  )
  return float(1 - correct / total)


def summarize(results: Sequence[StreamResult], domains) -> dict[str, Any]:
  """Per-domain metrics, averaged over seeds (with their std)."""
  per_seed = []
  for res in results:
    valid = res.valid.reshape(-1)
    dom = res.domain.reshape(-1)[valid]
    rec = {
      k: getattr(res, k).reshape(-1)[valid]
      for k in ('correct', 'nll', 'confidence')
    }
    invalid, nonfinite = (
      x.reshape(-1)[valid] if x is not None else np.zeros(len(dom), bool)
      for x in (res.invalid, res.nonfinite)
    )
    doms = {}
    for d, domain in enumerate(domains):
      sel = dom == d
      if not sel.any():
        continue
      m = metrics.summarize({k: v[sel] for k, v in rec.items()})
      # Rows with NaN or Inf pixels: masked out of adaptation, scored wrong.
      m['invalid_inputs'] = int(invalid[sel].sum())
      # Finite inputs with NaN or Inf logits (a diverged step): scored wrong.
      m['nonfinite_outputs'] = int(nonfinite[sel].sum())
      m['seconds'] = float(res.seconds[:, d].sum())
      m['examples_per_second'] = (
        m['n'] / m['seconds'] if m['seconds'] > 0 else float('nan')
      )
      doms[domain.name] = m
    overall = metrics.summarize(rec)
    overall['invalid_inputs'] = int(invalid.sum())
    overall['nonfinite_outputs'] = int(nonfinite.sum())
    overall['skipped_updates'] = (
      int(res.skipped.sum()) if res.skipped is not None else 0
    )
    per_seed.append((doms, overall, float(res.seconds.sum())))
  doms = {}
  for name in per_seed[0][0]:
    vals = [s[0][name] for s in per_seed]
    doms[name] = {k: float(np.mean([v[k] for v in vals])) for k in vals[0]}
    doms[name]['n'] = int(vals[0]['n'])
    if len(vals) > 1:
      doms[name]['error_std'] = float(np.std([v['error'] for v in vals]))
  errors = [np.mean([d['error'] for d in s[0].values()]) for s in per_seed]
  total_n = sum(d['n'] for d in doms.values())
  seconds = float(np.mean([s[2] for s in per_seed]))
  out = {
    'domains': doms,
    'mean_error': float(np.mean(errors)),
    'mean_ece': float(np.mean([d['ece'] for d in doms.values()])),
    'mean_nll': float(np.mean([d['nll'] for d in doms.values()])),
    'overall_error': float(np.mean([s[1]['error'] for s in per_seed])),
    'seconds': seconds,
    'examples_per_second': total_n / seconds if seconds > 0 else float('nan'),
    'num_seeds': len(per_seed),
    # Inputs with NaN or Inf pixels, and steps whose update was skipped
    # because it would have made the state non-finite (means over seeds).
    'invalid_inputs': float(
      np.mean([s[1]['invalid_inputs'] for s in per_seed])
    ),
    'nonfinite_outputs': float(
      np.mean([s[1]['nonfinite_outputs'] for s in per_seed])
    ),
    'skipped_updates': float(
      np.mean([s[1]['skipped_updates'] for s in per_seed])
    ),
  }
  if len(errors) > 1:
    out['mean_error_std'] = float(np.std(errors))
  return out


def merge_held_out(config, per_target: Mapping[str, dict]) -> dict[str, Any]:
  """Leave-one-domain-out: one entry per held-out domain per method."""
  targets = list(per_target)
  first = per_target[targets[0]]
  merged = {
    'config': configs.jsonable(config),
    'protocol': 'leave_one_domain_out',
    'source': {t: r['source'] for t, r in per_target.items()},
    'domains': targets,
    'methods': {},
  }
  names = [
    n
    for n in first['methods']
    if all(n in per_target[t]['methods'] for t in targets)
  ]
  for name in names:
    runs = {t: per_target[t]['methods'][name] for t in targets}
    doms = {t: runs[t]['domains'][t] for t in targets}
    seconds = sum(d['seconds'] for d in doms.values())
    entry = {
      'domains': doms,
      'mean_error': float(np.mean([d['error'] for d in doms.values()])),
      'mean_ece': float(np.mean([d['ece'] for d in doms.values()])),
      'mean_nll': float(np.mean([d['nll'] for d in doms.values()])),
      'seconds': seconds,
      'examples_per_second': (
        sum(d['n'] for d in doms.values()) / seconds
        if seconds > 0
        else float('nan')
      ),
      'held_out': runs,
    }
    for key in ('clean_error_before', 'clean_error_after', 'forgetting'):
      if all(key in r for r in runs.values()):
        entry[key] = float(np.mean([r[key] for r in runs.values()]))
    merged['methods'][name] = entry
  return merged
