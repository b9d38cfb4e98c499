"""Error vs the number of updates: how fast methods adapt to a new shift.

`curves(config, workdir, names)` adapts each method from scratch on every
domain of the test stream (reset per domain), records the error of the
k-th batch of the domain, and averages it over the domains and the
config's seeds, up to the shortest domain's number of batches. Batch k is
predicted after k - 1 updates on that domain. `updates_to_target` reads
off the first k at which a method's running mean reaches a target error
(MGG's convergence analysis compares it with SAR's final error), and
`write_curves` saves the curves, that target and the updates each method
needs as `<stem>.json` and `<stem>.png`.
"""

import json
import pathlib

import jax
import numpy as np
from absl import logging

from tta_jax import methods
from tta_jax.data import benchmarks
from tta_jax.runners import artifacts, configs

SMOOTH = 3  # batches averaged when reading "reached the target"


def curves(config, workdir, names) -> dict[str, list[float]]:
  """Per-batch error vs updates of methods `names`, reset per domain, every
  seed; the source model and trained methods come from `workdir`."""
  workdir = pathlib.Path(workdir)
  benchmark = benchmarks.build(config.data, 'reset_each_shift')
  module, apply_fn = artifacts.build_model(config.model, benchmark)
  variables, _ = artifacts.load_source(config, workdir, benchmark, module)
  out = {}
  for name in names:
    owner = configs.artifacts_owner(config, name)
    meta = (
      artifacts.load_meta(artifacts.trained_dir(workdir, owner))
      if owner
      else None
    )
    adapter = methods.from_config(
      configs.resolve(config, name, methods.METHODS),
      configs.method_kwargs(config, name),
      apply_fn,
    )
    step = jax.jit(adapter.step)
    runs = []
    for seed in configs.seeds_of(config):
      for d, domain in enumerate(benchmark.domains):
        order = np.random.default_rng([seed, d]).permutation(len(domain))
        state = adapter.init(variables, jax.random.key(config.seed))
        errs = []
        bs = config.batch_size
        for i in range(0, len(order) - bs + 1, bs):
          batch = domain.source[order[i : i + bs]]
          state, o = step(state, {'image': batch['image']}, meta=meta)
          errs.append(float(np.mean(np.argmax(o.logits, -1) != batch['label'])))
        runs.append(errs)
    horizon = min(map(len, runs))  # domains differ in size (UCI digits)
    if not horizon:
      raise ValueError(
        f'{name}: a domain has fewer than batch_size={config.batch_size} '
        'examples, so there is no full batch to adapt on'
      )
    out[name] = np.mean([r[:horizon] for r in runs], 0).tolist()
    logging.info('%s: %s', name, np.round(out[name], 3).tolist())
  return out


def updates_to_target(curve, target: float) -> int | None:
  """First k (1-based) whose SMOOTH-batch running mean is <= target."""
  c = np.convolve(curve, np.ones(SMOOTH) / SMOOTH, 'valid')
  hits = np.flatnonzero(c <= target + 1e-12)
  return int(hits[0]) + SMOOTH if hits.size else None


def write_curves(workdir, data: dict, stem: str = 'curves') -> dict:
  """`<stem>.json` and `<stem>.png` in `workdir`: the curves, SAR's final
  error (the mean of its last SMOOTH batches) as the target, and the
  updates each method needs to reach it."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  workdir = pathlib.Path(workdir)
  target = float(np.mean(data['sar'][-SMOOTH:])) if 'sar' in data else None
  reach = (
    {n: updates_to_target(c, target) for n, c in data.items()}
    if target is not None
    else {}
  )
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name, curve in data.items():
    ax.plot(np.arange(1, len(curve) + 1), 100 * np.asarray(curve), label=name)
  if target is not None:
    ax.axhline(100 * target, ls=':', c='k', lw=0.8, label="SAR's final")
  ax.set_xlabel('batch k within a domain (updates before it: k - 1)')
  ax.set_ylabel('error of batch k (%)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(workdir / f'{stem}.png', dpi=120)
  plt.close(fig)
  summary = {'curves': data, 'sar_final_error': target, 'updates': reach}
  (workdir / f'{stem}.json').write_text(json.dumps(summary, indent=2))
  return summary
