r"""MGG on the digits benchmark: pre-training, evaluation and the analyses.

  python -m experiments.mgg_analyses --config=configs/mgg_digits.py:analyses \
      --workdir=$WORKDIR --steps=train,adapt,curves,report

Steps:
  train   `experiments.meta_train_main`: pre-trains every
          `config.meta_methods` entry (`tta_jax.trainers.mgg`, on the
          validation stream's shifts) into WORKDIR/meta/<name>/, after the
          source model if WORKDIR has none.
  adapt   `experiments.adapt_main`: `config.methods` over the test stream
          (WORKDIR/results.*).
  curves  error of the k-th batch of every domain vs k (the number of
          updates taken), MGG vs SAR vs Tent, reset per domain, every seed,
          up to the shortest domain's number of batches:
          WORKDIR/mgg_curves.{json,png}, and the updates each method needs
          to reach SAR's final error.
  report  markdown tables of WORKDIR/results.json and, if present,
          WORKDIR/ablations.json (the variants run with
          `--config.results_name=ablations`), with each MGG's pre-training
          validation accuracy: WORKDIR/mgg_analyses.md.
"""

import json
import pathlib

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from tta_jax import methods
from tta_jax.data import benchmarks
from tta_jax.runners import adapt, artifacts, configs, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file.')
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and results.')
flags.DEFINE_list('steps', ['train', 'adapt', 'curves', 'report'], 'Steps.')
flags.DEFINE_list('curve_methods', ['tent', 'sar', 'mgg'], 'Curve methods.')
flags.mark_flags_as_required(['config', 'workdir'])

SMOOTH = 3  # batches averaged when reading "reached the target"


def curves(config, workdir: pathlib.Path, names) -> dict:
  """Per-batch error vs updates, reset per domain, every seed."""
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
    out[name] = np.mean([r[:horizon] for r in runs], 0).tolist()
    logging.info('%s: %s', name, np.round(out[name], 3).tolist())
  return out


def updates_to_target(curve, target: float) -> int | None:
  """First k (1-based) whose SMOOTH-batch running mean is <= target."""
  c = np.convolve(curve, np.ones(SMOOTH) / SMOOTH, 'valid')
  hits = np.flatnonzero(c <= target + 1e-12)
  return int(hits[0]) + SMOOTH if hits.size else None


def write_curves(workdir: pathlib.Path, data: dict) -> dict:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  target = float(np.mean(data['sar'][-SMOOTH:])) if 'sar' in data else None
  reach = {n: updates_to_target(c, target) for n, c in data.items()}
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name, curve in data.items():
    ax.plot(np.arange(1, len(curve) + 1), 100 * np.asarray(curve), label=name)
  if target is not None:
    ax.axhline(100 * target, ls=':', c='k', lw=0.8, label="SAR's final")
  ax.set_xlabel('batch k within a domain (updates before it: k - 1)')
  ax.set_ylabel('error of batch k (%)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(workdir / 'mgg_curves.png', dpi=120)
  summary = {'curves': data, 'sar_final_error': target, 'updates': reach}
  (workdir / 'mgg_curves.json').write_text(json.dumps(summary, indent=2))
  return summary


def _table(config, workdir: pathlib.Path, results_name: str) -> list[str]:
  path = workdir / f'{results_name}.json'
  if not path.exists():
    return []
  results = json.loads(path.read_text())['methods']
  lines = [
    f'{results_name}.json:',
    '',
    '| method | mean error (%) | std over seeds | seeds | pre-training '
    'val acc (%) |',
    '|---|---:|---:|---:|---:|',
  ]
  for name, r in results.items():
    owner = configs.artifacts_owner(config, name)
    meta = artifacts.trained_dir(workdir, owner or name) / 'metadata.json'
    acc = (
      json.loads(meta.read_text())['metrics'].get('val_accuracy')
      if owner and meta.exists()
      else None
    )
    lines.append(
      f'| {name} | {100 * r["mean_error"]:.2f} | '
      f'{100 * r.get("mean_error_std", float("nan")):.2f} | '
      f'{r.get("num_seeds", 1)} | '
      f'{"" if acc is None else f"{100 * acc:.2f}"} |'
    )
  return [*lines, '']


def report(config, workdir: pathlib.Path) -> str:
  """Markdown tables of results.json and ablations.json, and the updates."""
  lines = _table(config, workdir, 'results') + _table(
    config, workdir, 'ablations'
  )
  curves_path = workdir / 'mgg_curves.json'
  if curves_path.exists():
    c = json.loads(curves_path.read_text())
    lines.append(
      f"Updates to reach SAR's final error ({100 * c['sar_final_error']:.2f}"
      f' %, {SMOOTH}-batch mean): '
      + ', '.join(f'{n}: {k}' for n, k in c['updates'].items())
    )
  text = '\n'.join(lines)
  (workdir / 'mgg_analyses.md').write_text(text + '\n')
  return text


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config, workdir = FLAGS.config, pathlib.Path(FLAGS.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if 'train' in FLAGS.steps:
    train.run(config, workdir)
  if 'adapt' in FLAGS.steps:
    adapt.run(config, workdir)
  if 'curves' in FLAGS.steps:
    write_curves(workdir, curves(config, workdir, FLAGS.curve_methods))
  if 'report' in FLAGS.steps:
    print(report(config, workdir))


if __name__ == '__main__':
  app.run(main)
